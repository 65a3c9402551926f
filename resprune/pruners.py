"""Token pruners behind one interface: ResPrune and the baselines it is compared with.

A pruner sees the projector outputs of one image (or one anyres crop) as a `TokenSet` and
returns the kept indices, ascending, so kept tokens keep their order and positions.
Prefix-consistent pruners (``prefix_consistent = True``: the first k' picks of a run to k
are the run to k') also return the pick order, and their ``prefix`` cuts a result to a
smaller budget without another call (LLaVA-NeXT's budget search uses it). The
`pool` baseline replaces tokens by window averages and reports each window's centre as its
position. Pruners know nothing about models or prompts; adapters build the TokenSets.

Host reads: every pruner reads the device at most once per ``prune`` call, whatever the
number of sets (so eval's speed comparison is like for like): the baselines draw or lay out
their indices on the host, compute every set's retained energy on the device, and read all
of them back together (`resprune.host.to_host`); DivPrune runs its greedy picks batched over
the padded sets on the device and reads the pick order with the energies. Their indices come
back on the host, as ResPrune's do.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from resprune.floor import RELEVANCE_FLOOR, check_relevance_floor
from resprune.host import to_device, to_host
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


def _span_share(tokens: torch.Tensor, basis_tokens: torch.Tensor) -> torch.Tensor:
    """`span_energy` as a 0-d float32 tensor on the tokens' device (no read)."""
    x = tokens.float()
    total = (x * x).sum()
    q, _ = torch.linalg.qr(basis_tokens.float().T)  # [D, k]
    inside = ((x @ q) ** 2).sum()
    return torch.where(total > 0, inside / total.clamp_min(1e-30), torch.ones_like(total))


def _read_shares(shares: list[torch.Tensor], *more: torch.Tensor) -> tuple[list[float], ...]:
    """Every set's retained share (and ``more`` tensors) read back with one device read."""
    host = to_host(torch.stack(shares), *more)
    return (host[0].tolist(), *host[1:])


def _gathered(sets: list[TokenSet], indices: list[np.ndarray]) -> list[torch.Tensor]:
    """Each set's kept tokens, the host indices copied in once for the whole batch."""
    device = sets[0].tokens.device
    flat = to_device(np.concatenate(indices), device).split([len(i) for i in indices])
    return [s.tokens[i] for s, i in zip(sets, flat, strict=True)]


def _host_pruned(sets, indices: list[np.ndarray], **extra) -> list[Pruned]:
    """Pruned results for host ``indices`` with their retained energies (one device read)."""
    shares = [
        _span_share(s.tokens, kept) for s, kept in zip(sets, _gathered(sets, indices), strict=True)
    ]
    (energies,) = _read_shares(shares)
    return [Pruned(torch.from_numpy(i), e, **extra) for i, e in zip(indices, energies, strict=True)]


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
        if not sets:
            return []
        indices = []
        for s, k in zip(sets, ks, strict=True):  # drawn on the host: no device work
            n = s.tokens.shape[0]
            digest = hashlib.sha256(f"{self.seed}:{s.key or ''}:{n}".encode()).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)
            indices.append(torch.randperm(n, generator=gen)[:k].sort().values.numpy())
        return _host_pruned(sets, indices)


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
        if not sets:
            return []
        indices = [uniform_indices(*_grid(s), k).numpy() for s, k in zip(sets, ks, strict=True)]
        return _host_pruned(sets, indices)


class PoolPrune:
    """2-D average pooling of the grid to at most k tokens ("just downsample")."""

    name = "pool"
    prefix_consistent = False

    def prune(self, sets: list[TokenSet], ks: list[int]) -> list[Pruned]:
        _check(sets, ks)
        if not sets:
            return []
        indices, pooled, shares = [], [], []
        for s, k in zip(sets, ks, strict=True):
            rows, cols = _grid(s)
            gr = max(1, min(rows, math.floor(math.sqrt(k * rows / cols))))
            gc = max(1, min(cols, k // gr))
            img = s.tokens.float().T.reshape(1, -1, rows, cols)
            windows = torch.nn.functional.adaptive_avg_pool2d(img, (gr, gc))[0].flatten(1).T
            r = ((torch.arange(gr) + 0.5) * rows / gr).long()
            c = ((torch.arange(gc) + 0.5) * cols / gc).long()
            indices.append((r[:, None] * cols + c[None, :]).flatten())
            pooled.append(windows.to(s.tokens.dtype))
            shares.append(_span_share(s.tokens, windows))
        (energies,) = _read_shares(shares)
        return [Pruned(i, e, tokens=t) for i, e, t in zip(indices, energies, pooled, strict=True)]


class DivPrune:
    """Greedy max-min cosine diversity: repeatedly add the token farthest from the kept set."""

    name = "divprune"
    prefix_consistent = True  # each pick depends only on the picks before it

    def prune(self, sets: list[TokenSet], ks: list[int]) -> list[Pruned]:
        """Every set's picks batched on the device (padded to the largest set, run to the
        largest budget: each pick depends only on the ones before it), with the energy each
        prefix of them retains; one device read."""
        _check(sets, ks)
        if not sets:
            return []
        order = _max_min_order(sets, max(ks))
        curves = [
            _prefix_shares(s.tokens, s.tokens.index_select(0, order[b, :k]))
            for b, (s, k) in enumerate(zip(sets, ks, strict=True))
        ]
        picks, *host = to_host(order, *curves)
        out = []
        for k, curve, row in zip(ks, host, picks, strict=True):
            chosen = torch.from_numpy(np.ascontiguousarray(row[:k]))
            curve_k = torch.from_numpy(curve)
            out.append(
                Pruned(
                    chosen.sort().values, float(curve[-1]), order=chosen, retained_by_prefix=curve_k
                )
            )
        return out

    def prefix(self, pruned: Pruned, tokens: TokenSet, k: int) -> Pruned:
        """``pruned`` cut to its first ``k`` picks: what ``prune`` at budget k returns (its
        retained energy came with the picks: no device work)."""
        del tokens
        curve = pruned.retained_by_prefix[:k]
        return Pruned(
            _sorted_prefix(pruned, k),
            float(curve.numpy()[-1]),
            order=pruned.order[:k],
            retained_by_prefix=curve,
        )


def _prefix_shares(tokens: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    """Share of ``tokens``' energy inside the span of each prefix of ``picked`` [k, D] (in
    pick order): float32 [k] on the device. One QR: its first j columns span the first j
    picks; a pick already in the span of the earlier ones (zero pivot) adds nothing."""
    x = tokens.float()
    total = (x * x).sum()
    q, r = torch.linalg.qr(picked.float().T)  # [D, m], [m, k]; m = min(D, k)
    pivots = r.diagonal().abs()
    new = pivots > 1e-6 * pivots.amax().clamp_min(1e-30)
    captured = ((x @ q) ** 2).sum(0) * new  # [m]
    curve = captured.cumsum(0)
    curve = torch.cat([curve, curve[-1:].expand(picked.shape[0] - curve.shape[0])])
    share = (curve / total.clamp_min(1e-30)).clamp_max(1.0)
    return torch.where(total > 0, share, torch.ones_like(share))


def _max_min_order(sets: list[TokenSet], k: int) -> torch.Tensor:
    """DivPrune's pick order [B, k] on the device: first the token with the largest summed
    cosine distance to its set, then repeatedly the one farthest from every pick so far
    (ties to the lowest index); padding never picked (k <= every set's size)."""
    x = torch.nn.utils.rnn.pad_sequence([s.tokens.float() for s in sets], batch_first=True)
    lengths = [s.tokens.shape[0] for s in sets]
    valid = to_device(np.arange(x.shape[1])[None] < np.asarray(lengths)[:, None], x.device)
    v = torch.nn.functional.normalize(x, dim=-1)
    dist = 1 - torch.bmm(v, v.transpose(1, 2))  # cosine distance [B, N, N]
    spread = (dist * valid[:, None, :]).sum(-1).masked_fill(~valid, -math.inf)
    pick = spread.argmax(-1, keepdim=True)  # [B, 1]
    order = [pick]
    nearest = dist.gather(1, pick[:, :, None].expand(-1, 1, x.shape[1]))[:, 0]
    blocked = (~valid).scatter(1, pick, True)
    for _ in range(k - 1):
        pick = nearest.masked_fill(blocked, -math.inf).argmax(-1, keepdim=True)
        order.append(pick)
        row = dist.gather(1, pick[:, :, None].expand(-1, 1, x.shape[1]))[:, 0]
        nearest = torch.minimum(nearest, row)
        blocked = blocked.scatter(1, pick, True)
    return torch.cat(order, dim=1)


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
