"""Per-image token budgets: the keep value, split across crops, with layout rows inside it.

``keep`` bounds what the LLM sees of an image: selected visual tokens *plus* the layout
tokens they bring along (LLaVA-NeXT's ``image_newline``, one per high-resolution row that
keeps a token), so pruners with different spatial spreads get the same real budget. How
many rows survive is only known after selection, so the selection budget of an image with
layout rows is searched: an overshoot is taken off it, a slack added, until the largest
fitting one is found (the bracket narrows every round, so this ends; a few rounds in
practice). Within an image, the selection budget is split across crops in proportion to
their sizes (largest remainder). A prefix-consistent pruner (ResPrune, DivPrune) is called
once, each crop at the largest share any searched k could give it, and the search runs on
prefixes of those picks (same result as one call per round); other pruners are called
once per round. This module knows nothing about models or prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from resprune.host import to_device, to_host
from resprune.models.base import Crop
from resprune.pruners import Pruned, Pruner, TokenSet, resolve_keep


@dataclass
class ImageTokens:
    """One image's packed features, the crops offered to the pruner and its layout rows."""

    features: torch.Tensor  # [N, D] as the LLM sees them (layout tokens included)
    crops: list[Crop]
    newline_rows: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    text: torch.Tensor | None = None  # [T, D] content-word embeddings
    key: str = ""  # item id ("" when unknown): seeds the random baseline per image
    _row_of: np.ndarray | None = field(default=None, repr=False, compare=False)

    def row_of(self) -> np.ndarray:
        """Per packed token, the layout token closing its row (-1: none), on the host."""
        if self._row_of is None:
            rows = np.full(self.features.shape[0], -1, dtype=np.int64)
            for newline, members in self.newline_rows:
                rows[members.numpy()] = newline
            self._row_of = rows
        return self._row_of


Picks = list[tuple[Crop, TokenSet, Pruned]]


def split_budget(k: int, sizes: list[int]) -> list[int]:
    """``k`` split across crops in proportion to ``sizes`` (largest remainder)."""
    n = sum(sizes)
    exact = [k * s / n for s in sizes]
    ks = [int(e) for e in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda c: (ks[c] - exact[c], c))
    for c in by_remainder[: k - sum(ks)]:
        ks[c] += 1
    return ks


def kept_rows(image: ImageTokens, kept: np.ndarray) -> list[int]:
    """Layout tokens that stay: those whose row keeps at least one token (packed indices,
    ascending; host arithmetic)."""
    if not image.newline_rows:
        return []
    rows = image.row_of()[kept]
    return np.unique(rows[rows >= 0]).tolist()


def largest_shares(k: int, sizes: list[int]) -> list[int]:
    """Per crop, the largest share `split_budget` gives it over budgets 1..k.

    Largest-remainder splits are not monotone in k (a crop's share can drop as k grows), so
    the share at k alone is not an upper bound for smaller budgets.
    """
    shares = [0] * len(sizes)
    for budget in range(1, k + 1):
        shares = [max(a, b) for a, b in zip(shares, split_budget(budget, sizes), strict=True)]
    return shares


def select_within_budget(
    pruner: Pruner, keep: int | float, images: list[ImageTokens]
) -> list[Picks]:
    """Prune every image so its kept tokens plus the layout rows they keep fit its budget.

    Per image the selection budget k is searched: the largest k whose picks plus rows fit
    (k + 1 overshoots), or k = 1 when even one token and its row overshoot.
    """
    searches = [_Search(resolve_keep(keep, img.features.shape[0]), img) for img in images]
    if getattr(pruner, "prefix_consistent", False):
        _search_on_prefixes(pruner, images, searches)
    else:
        _search_by_calls(pruner, images, searches)
    return [s.best for s in searches]


def _search_by_calls(pruner: Pruner, images: list[ImageTokens], searches: list[_Search]) -> None:
    """Each round, one pruner call at every unfinished image's current k."""
    todo = list(range(len(images)))
    while todo:
        chosen = _prune(pruner, [images[i] for i in todo], [searches[i].k for i in todo])
        todo = [
            i
            for i, mine in zip(todo, chosen, strict=True)
            if not searches[i].step(mine, pruner.name == "none")
        ]


def _search_on_prefixes(pruner: Pruner, images: list[ImageTokens], searches: list[_Search]) -> None:
    """One pruner call at each crop's largest share, then every round cuts prefixes of it."""
    sizes = [[len(c.index) for c in img.crops] for img in images]
    caps = [largest_shares(s.k, n) for s, n in zip(searches, sizes, strict=True)]
    longest = _prune_crops(pruner, images, caps)
    for search, img, picks, n in zip(searches, images, longest, sizes, strict=True):
        done = False
        while not done:
            done = search.step(_cut(pruner, img, picks, split_budget(search.k, n)), False)


def _cut(pruner: Pruner, image: ImageTokens, longest: Picks, shares: list[int]) -> Picks:
    """The picks of a call at per-crop ``shares``, cut from ``longest`` (larger shares)."""
    by_crop = {id(crop): (tokens, pruned) for crop, tokens, pruned in longest}
    picks: Picks = []
    for crop, crop_share in zip(image.crops, shares, strict=True):
        if crop_share > 0:
            tokens, pruned = by_crop[id(crop)]
            picks.append((crop, tokens, pruner.prefix(pruned, tokens, crop_share)))
    return picks


class _Search:
    """Search of one image's selection budget k; ``step`` returns True when done."""

    def __init__(self, target: int, image: ImageTokens):
        self.target, self.image = target, image
        self.k = min(target, sum(len(c.index) for c in image.crops))
        self.fits = 0  # largest k known to fit
        self.overshoots = self.k + 1  # smallest k known to overshoot
        self.best: Picks = []

    def step(self, picks: Picks, keep_all: bool) -> bool:
        kept = kept_index(picks)
        used = len(kept) + len(kept_rows(self.image, kept))
        if used <= self.target or keep_all:
            self.fits, self.best = self.k, picks
            if keep_all or used == self.target or self.k + 1 >= self.overshoots:
                return True
            self.k = min(self.k + self.target - used, self.overshoots - 1)
            return False
        self.overshoots = self.k
        if self.k == 1:  # nothing smaller exists: one token and its row
            self.best = picks
            return True
        if self.fits == self.k - 1:
            return True
        self.k = max(self.fits + 1, self.k - (used - self.target))
        return False


def kept_index(picks: Picks) -> np.ndarray:
    """Packed indices of the kept visual tokens (crop order), layout rows excluded (host)."""
    index = [c.index.numpy()[host_indices(p)] for c, _, p in picks]
    return np.concatenate(index) if index else np.zeros(0, dtype=np.int64)


def host_indices(pruned: Pruned) -> np.ndarray:
    """A pruner's kept indices on the host (resprune and none give them there; a baseline
    that keeps them on the device pays a read)."""
    t = pruned.indices
    return t.numpy() if t.device.type == "cpu" else to_host(t)[0]


def _prune(pruner: Pruner, images: list[ImageTokens], ks: list[int]) -> list[Picks]:
    """One pruner call over every crop of every image, image i's ``ks[i]`` split by crop."""
    shares = []
    for img, k in zip(images, ks, strict=True):
        sizes = [len(c.index) for c in img.crops]
        shares.append(sizes if pruner.name == "none" else split_budget(k, sizes))
    return _prune_crops(pruner, images, shares)


def _prune_crops(pruner: Pruner, images: list[ImageTokens], shares: list[list[int]]) -> list[Picks]:
    """One pruner call over every crop with a positive share (``shares[i][c]`` tokens)."""
    owners = [
        (i, c, crop)
        for i, (img, per_crop) in enumerate(zip(images, shares, strict=True))
        for c, (crop, kc) in enumerate(zip(img.crops, per_crop, strict=True))
        if kc > 0
    ]
    tokens = crop_tokens(images, [(i, crop) for i, _, crop in owners])
    sets = [
        TokenSet(t, crop.grid, images[i].text, f"{images[i].key}#{c}" if images[i].key else None)
        for (i, c, crop), t in zip(owners, tokens, strict=True)
    ]
    budgets = [shares[i][c] for i, c, _ in owners]
    pruned = pruner.prune(sets, budgets) if sets else []
    picks: list[Picks] = [[] for _ in images]
    for (i, _, crop), s, p in zip(owners, sets, pruned, strict=True):
        picks[i].append((crop, s, p))
    return picks


def crop_tokens(images: list[ImageTokens], crops: list[tuple[int, Crop]]) -> list[torch.Tensor]:
    """The features of each (image, crop): the image's own tensor for a crop that is all of
    it, in order; the others with one gather over the batch (one host-to-device index copy)."""
    out: list[torch.Tensor | None] = [None] * len(crops)
    gather: list[int] = []
    for j, (i, crop) in enumerate(crops):
        index, n = crop.index.numpy(), images[i].features.shape[0]
        if len(index) == n and (index == np.arange(n)).all():
            out[j] = images[i].features
        else:
            gather.append(j)
    if gather:
        sources = sorted({crops[j][0] for j in gather})
        lengths = [len(images[i].features) for i in sources]
        start = dict(zip(sources, np.cumsum([0, *lengths])[:-1].tolist(), strict=True))
        flat = np.concatenate([crops[j][1].index.numpy() + start[crops[j][0]] for j in gather])
        features = [images[i].features for i in sources]
        source = torch.cat(features) if len(features) > 1 else features[0]
        taken = source[to_device(flat, source.device)]
        sizes = [len(crops[j][1].index) for j in gather]
        for j, t in zip(gather, taken.split(sizes), strict=True):
            out[j] = t
    return out  # type: ignore[return-value]


# ---- used by energy budgets (`resprune.adaptive`): one call, then cuts of it


def prune_crops(pruner: Pruner, images: list[ImageTokens], shares: list[list[int]]) -> list[Picks]:
    """One pruner call over every crop with a positive share (``shares[i][c]`` tokens)."""
    return _prune_crops(pruner, images, shares)


def search_on_picks(pruner: Pruner, image: ImageTokens, longest: Picks, target: int) -> Picks:
    """What `select_within_budget` picks for ``image`` at ``target`` tokens, cut from
    ``longest`` (a prefix-consistent pruner's picks at per-crop shares no smaller than
    `largest_shares` gives for ``target``)."""
    search = _Search(target, image)
    sizes = [len(c.index) for c in image.crops]
    while not search.step(_cut(pruner, image, longest, split_budget(search.k, sizes)), False):
        pass
    return search.best
