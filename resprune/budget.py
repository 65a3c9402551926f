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

import torch

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


def kept_rows(image: ImageTokens, kept: torch.Tensor) -> list[int]:
    """Layout tokens that stay: those whose row keeps at least one token (packed indices)."""
    return [nl for nl, row in image.newline_rows if torch.isin(row, kept).any()]


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


def kept_index(picks: Picks) -> torch.Tensor:
    """Packed indices of the kept visual tokens (crop order), layout rows excluded."""
    index = [c.index[p.indices.cpu()] for c, _, p in picks]
    return torch.cat(index) if index else torch.zeros(0, dtype=torch.long)


def _prune(pruner: Pruner, images: list[ImageTokens], ks: list[int]) -> list[Picks]:
    """One pruner call over every crop of every image, image i's ``ks[i]`` split by crop."""
    shares = []
    for img, k in zip(images, ks, strict=True):
        sizes = [len(c.index) for c in img.crops]
        shares.append(sizes if pruner.name == "none" else split_budget(k, sizes))
    return _prune_crops(pruner, images, shares)


def _prune_crops(pruner: Pruner, images: list[ImageTokens], shares: list[list[int]]) -> list[Picks]:
    """One pruner call over every crop with a positive share (``shares[i][c]`` tokens)."""
    sets, budgets, owners = [], [], []
    for i, (img, per_crop) in enumerate(zip(images, shares, strict=True)):
        for c, (crop, kc) in enumerate(zip(img.crops, per_crop, strict=True)):
            if kc > 0:
                key = f"{img.key}#{c}" if img.key else None
                index = crop.index.to(img.features.device)
                sets.append(TokenSet(img.features[index], crop.grid, img.text, key))
                budgets.append(kc)
                owners.append((i, crop))
    pruned = pruner.prune(sets, budgets) if sets else []
    picks: list[Picks] = [[] for _ in images]
    for (i, crop), s, p in zip(owners, sets, pruned, strict=True):
        picks[i].append((crop, s, p))
    return picks


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
