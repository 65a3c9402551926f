"""Token pruners behind one interface: ResPrune and the baselines it is compared with.

A pruner sees the projector outputs of one image (or one anyres crop) as a `TokenSet` and
returns the kept indices, ascending, so kept tokens keep their order and positions.
Prefix-consistent pruners (``prefix_consistent = True``: the first k' picks of a run to k
are the run to k') also return the pick order, and their ``prefix`` cuts a result to a
smaller budget without another call (LLaVA-NeXT's budget search uses it). The
`pool` baseline replaces tokens by window averages and reports each window's centre as its
position. Pruners know nothing about models or prompts; adapters build the TokenSets.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from resprune.floor import RELEVANCE_FLOOR, check_relevance_floor
from resprune.host import to_device
from resprune.relevance import token_relevance
from resprune.select import select_prefixes


@dataclass
class TokenSet:
    """Visual tokens of one image or crop, with their grid and the question's word embeddings."""

    tokens: torch.Tensor  # [N, D]
    grid: tuple[int, int] | None = None  # (rows, cols), row-major, rows * cols == N
    text: torch.Tensor | None = None  # [T, D] LLM input embeddings of content-word tokens
    key: str | None = None  # stable name of the image/crop (item id): seeds the random baseline


@dataclass
class Pruned:
    """A pruner's choice for one TokenSet."""

    indices: torch.Tensor  # long [k], ascending (on the host for resprune and none)
    retained_energy: float
    tokens: torch.Tensor | None = None  # replacement features [k, D]; None: tokens[indices]
    relevance: torch.Tensor | None = None  # [N] r_i when the pruner used the text
    order: torch.Tensor | None = None  # long [k]: picks in pick order (prefix-consistent)
    retained_by_prefix: torch.Tensor | None = None  # [k]: retained_energy of each prefix


class Pruner(Protocol):
    """Selects k tokens per set; ``prune`` is batched over sets.

    A pruner with ``prefix_consistent = True`` also has ``prefix(pruned, tokens, k)``.
    """

    name: str
    prefix_consistent: bool

    def prune(self, sets: list[TokenSet], ks: list[int]) -> list[Pruned]: ...


def resolve_keep(keep: int | float, n: int) -> int:
    """Tokens to keep of ``n``: an int is capped at n, a float in (0, 1] is a fraction."""
    if isinstance(keep, bool) or not isinstance(keep, int | float):
        raise ValueError(f"keep must be an int or a float, got {keep!r}")
    if isinstance(keep, int):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        return min(keep, n)
    if not 0 < keep <= 1:
        raise ValueError(f"keep as a fraction must be in (0, 1], got {keep}")
    return max(1, min(n, round(keep * n)))


def span_energy(tokens: torch.Tensor, basis_tokens: torch.Tensor) -> float:
    """Share of ``tokens``' energy inside span(``basis_tokens``) (float32)."""
    x = tokens.float()
    total = float((x * x).sum())
    if total == 0:
        return 1.0
    q, _ = torch.linalg.qr(basis_tokens.float().T)  # [D, k]
    return float(((x @ q) ** 2).sum()) / total


def _check(sets: list[TokenSet], ks: list[int]) -> None:
    if len(sets) != len(ks):
        raise ValueError(f"got {len(sets)} token sets but {len(ks)} budgets")
    for i, (s, k) in enumerate(zip(sets, ks, strict=True)):
        if not 1 <= k <= s.tokens.shape[0]:
            raise ValueError(f"set {i}: k must be in [1, {s.tokens.shape[0]}], got {k}")


class ResPrune:
    """Greedy residual-energy subspace expansion modulated by text relevance (batched)."""

    name = "resprune"
    prefix_consistent = True

    def __init__(self, alpha: float = 1.0, relevance_floor: float = RELEVANCE_FLOOR):
        check_relevance_floor(alpha, relevance_floor)
        self.alpha, self.relevance_floor = alpha, relevance_floor

    def prune(self, sets: list[TokenSet], ks: list[int]) -> list[Pruned]:
        """One batched selector call over all sets, each truncated to its own budget.

        The picks come back on the host (one device read for the whole call, with the
        selector's checks), so budget searches and prefixes cost no further reads; the
        relevance stays on the device.
        """
        _check(sets, ks)
        x = torch.nn.utils.rnn.pad_sequence([s.tokens for s in sets], batch_first=True)
        lengths = [s.tokens.shape[0] for s in sets]
        mask = to_device(np.arange(x.shape[1])[None] < np.asarray(lengths)[:, None], x.device)
        rel = torch.ones(mask.shape, device=x.device)
        with_text = self.alpha != 0
        for b, s in enumerate(sets):
            if with_text and s.text is not None:
                rel[b, : lengths[b]] = token_relevance(s.tokens, s.text)
        sels = select_prefixes(
            x,
            ks,
            relevance=rel,
            alpha=self.alpha,
            mask=mask,
            relevance_floor=self.relevance_floor,
            host=True,
        )
        return [
            Pruned(
                indices=sel.indices,
                retained_energy=float(sel.retained_energy.numpy()),
                relevance=rel[b, : lengths[b]] if with_text and s.text is not None else None,
                order=sel.order,
                retained_by_prefix=sel.retained_by_prefix,
            )
            for b, (s, sel) in enumerate(zip(sets, sels, strict=True))
        ]

    def prefix(self, pruned: Pruned, tokens: TokenSet, k: int) -> Pruned:
        """``pruned`` cut to its first ``k`` picks: what ``prune`` at budget k returns."""
        del tokens  # the retained energy of every prefix came with the picks (on the host)
        curve = pruned.retained_by_prefix[:k]
        return Pruned(
            _sorted_prefix(pruned, k),
            float(curve.numpy()[-1]),
            relevance=pruned.relevance,
            order=pruned.order[:k],
            retained_by_prefix=curve,
        )


class KeepAll:
    """No pruning: every token is kept (the unpruned reference)."""

    name = "none"
    prefix_consistent = False

    def prune(self, sets: list[TokenSet], ks: list[int]) -> list[Pruned]:
        _check(sets, ks)
        return [Pruned(torch.arange(s.tokens.shape[0]), 1.0) for s in sets]  # on the host


class RandomPrune:
    """k tokens uniformly at random: a different mask per image, reproducible from its key.

    The draw is seeded by (seed, the set's key, N), so an item gets the same mask in every
    run and batch, different items get different masks, and budgets nest (the k kept at a
    smaller budget are among those kept at a larger one). A set without a key (library use
    without ids) falls back to one mask per (seed, N).
    """

    name = "random"
    prefix_consistent = False

    def __init__(self, seed: int = 0):
        self.seed = seed

    def prune(self, sets: list[TokenSet], ks: list[int]) -> list[Pruned]:
        _check(sets, ks)
        out = []
        for s, k in zip(sets, ks, strict=True):
            n = s.tokens.shape[0]
            digest = hashlib.sha256(f"{self.seed}:{s.key or ''}:{n}".encode()).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)
            idx = torch.randperm(n, generator=gen)[:k].sort().values.to(s.tokens.device)
            out.append(Pruned(idx, span_energy(s.tokens, s.tokens[idx])))
        return out


def _sorted_prefix(pruned: Pruned, k: int) -> torch.Tensor:
    """The first ``k`` picks of ``pruned.order``, ascending."""
    if pruned.order is None or not 1 <= k <= len(pruned.order):
        made = 0 if pruned.order is None else len(pruned.order)
        raise ValueError(f"prefix of {k} picks asked of a result with {made} picks in order")
    return pruned.order[:k].sort().values


def _grid(s: TokenSet) -> tuple[int, int]:
    return s.grid if s.grid is not None else (1, s.tokens.shape[0])


def uniform_indices(rows: int, cols: int, k: int) -> torch.Tensor:
    """k grid positions at an even 2-D stride (row-major, ascending)."""
    gr = max(1, min(rows, round(math.sqrt(k * rows / cols))))
    gc = min(cols, math.ceil(k / gr))
    while gr * gc < k:  # thin grids: grow the other side
        gr = min(rows, gr + 1)
        gc = min(cols, math.ceil(k / gr))
    r = ((torch.arange(gr) + 0.5) * rows / gr).long()
    c = ((torch.arange(gc) + 0.5) * cols / gc).long()
    cand = (r[:, None] * cols + c[None, :]).flatten()
    pick = ((torch.arange(k) + 0.5) * cand.numel() / k).long()
    return cand[pick].unique(sorted=True)


class UniformPrune:
    """Even spatial stride over the token grid."""

    name = "uniform"
    prefix_consistent = False

    def prune(self, sets: list[TokenSet], ks: list[int]) -> list[Pruned]:
        _check(sets, ks)
        out = []
        for s, k in zip(sets, ks, strict=True):
            idx = uniform_indices(*_grid(s), k).to(s.tokens.device)
            out.append(Pruned(idx, span_energy(s.tokens, s.tokens[idx])))
        return out


class PoolPrune:
    """2-D average pooling of the grid to at most k tokens ("just downsample")."""

    name = "pool"
    prefix_consistent = False

    def prune(self, sets: list[TokenSet], ks: list[int]) -> list[Pruned]:
        _check(sets, ks)
        out = []
        for s, k in zip(sets, ks, strict=True):
            rows, cols = _grid(s)
            gr = max(1, min(rows, math.floor(math.sqrt(k * rows / cols))))
            gc = max(1, min(cols, k // gr))
            img = s.tokens.float().T.reshape(1, -1, rows, cols)
            pooled = torch.nn.functional.adaptive_avg_pool2d(img, (gr, gc))[0].flatten(1).T
            r = ((torch.arange(gr) + 0.5) * rows / gr).long()
            c = ((torch.arange(gc) + 0.5) * cols / gc).long()
            idx = (r[:, None] * cols + c[None, :]).flatten().to(s.tokens.device)
            tokens = pooled.to(s.tokens.dtype)
            out.append(Pruned(idx, span_energy(s.tokens, pooled), tokens=tokens))
        return out


class DivPrune:
    """Greedy max-min cosine diversity: repeatedly add the token farthest from the kept set."""

    name = "divprune"
    prefix_consistent = True  # each pick depends only on the picks before it

    def prune(self, sets: list[TokenSet], ks: list[int]) -> list[Pruned]:
        _check(sets, ks)
        out = []
        for s, k in zip(sets, ks, strict=True):
            v = torch.nn.functional.normalize(s.tokens.float(), dim=-1)
            dist = 1 - v @ v.T  # cosine distance [N, N]
            first = int(dist.sum(dim=1).argmax())  # the most isolated token on average
            chosen = [first]
            nearest = dist[first].clone()
            nearest[first] = -1.0
            for _ in range(k - 1):
                nxt = int(nearest.argmax())
                chosen.append(nxt)
                nearest = torch.minimum(nearest, dist[nxt])
                nearest[chosen] = -1.0
            idx = torch.tensor(sorted(chosen), device=s.tokens.device)
            order = torch.tensor(chosen, device=s.tokens.device)
            out.append(Pruned(idx, span_energy(s.tokens, s.tokens[idx]), order=order))
        return out

    def prefix(self, pruned: Pruned, tokens: TokenSet, k: int) -> Pruned:
        """``pruned`` cut to its first ``k`` picks: what ``prune`` at budget k returns."""
        idx = _sorted_prefix(pruned, k)
        return Pruned(idx, span_energy(tokens.tokens, tokens.tokens[idx]), order=pruned.order[:k])


PRUNERS = ("resprune", "none", "random", "uniform", "pool", "divprune")


def build_pruner(
    method: str, *, alpha: float = 1.0, seed: int = 0, relevance_floor: float = RELEVANCE_FLOOR
) -> Pruner:
    """The pruner registered under ``method`` (see PRUNERS)."""
    if method == "resprune":
        return ResPrune(alpha, relevance_floor)
    if method == "random":
        return RandomPrune(seed)
    simple = {"none": KeepAll, "uniform": UniformPrune, "pool": PoolPrune, "divprune": DivPrune}
    if method not in simple:
        raise ValueError(f"unknown pruning method {method!r}; choose one of {', '.join(PRUNERS)}")
    return simple[method]()
