"""Energy budgets: per image, the fewest picks that retain a share tau of its token energy.

`EnergyKeep(energy=tau, min=lo, max=hi)`. ResPrune's (and DivPrune's) greedy picks are
prefix-consistent and come with the energy share each prefix retains (`retained_by_prefix`),
so one pruner call
serves every budget up to hi: each crop (LLaVA-NeXT's base view and tiles; the whole image
for the other families) is selected once, to min(its tokens, hi), and keeps k_c, the shortest
prefix whose retained share of that crop's energy reaches tau (its whole run when none does).
The item then holds sum k_c plus the layout rows those picks keep (LLaVA-NeXT's newlines,
inside the budget as for a fixed keep). Below lo or above hi, the item is selected exactly as
a fixed ``keep = lo`` or ``keep = hi`` selects it, cut from the same call. So every item's
picks are the fixed-k picks at its chosen k. tau = 1 keeps hi: float32 can show a share of
1.0 before the span is complete. Each image's k depends on its own tokens only, never on its
batch-mates. Non-goals: pruners without per-prefix energy (random, uniform, pool; `none`
keeps all).
"""

from __future__ import annotations

import torch

from resprune.budget import (
    ImageTokens,
    Picks,
    kept_index,
    kept_rows,
    prune_crops,
    search_on_picks,
    select_within_budget,
)
from resprune.keep import EnergyKeep
from resprune.pruners import Pruner, resolve_keep


def select_by_energy(pruner: Pruner, keep: EnergyKeep, images: list[ImageTokens]) -> list[Picks]:
    """Per image, the picks of the chosen k (see the module docstring); one pruner call."""
    if pruner.name == "none":
        return select_within_budget(pruner, 1.0, images)
    if not getattr(pruner, "prefix_consistent", False):
        raise ValueError(f"an energy budget needs a prefix-consistent pruner, got {pruner.name}")
    bounds = [_bounds(keep, img) for img in images]
    caps = [
        [min(len(c.index), hi) for c in img.crops]
        for img, (_, hi) in zip(images, bounds, strict=True)
    ]
    longest = prune_crops(pruner, images, caps)
    needed = _energy_prefixes(longest, keep.energy, pruner.name)
    return [
        _within(pruner, img, picks, ks, bound, keep.energy)
        for img, picks, ks, bound in zip(images, longest, needed, bounds, strict=True)
    ]


def max_kept(keep: int | float | EnergyKeep, n: int) -> int:
    """Most tokens of ``n`` that ``keep`` can keep: an upper bound known before selection."""
    if isinstance(keep, EnergyKeep):
        return min(keep.max, n)
    return resolve_keep(keep, n)


def _bounds(keep: EnergyKeep, image: ImageTokens) -> tuple[int, int]:
    """(lo, hi): min and max capped at the image's tokens, layout rows included."""
    hi = min(keep.max, image.features.shape[0])
    return min(keep.min, hi), hi


def _energy_prefixes(longest: list[Picks], energy: float, name: str) -> list[list[int]]:
    """Per image and crop, the shortest prefix whose retained energy reaches ``energy``."""
    short = []
    for picks in longest:
        for _, _, pruned in picks:
            if pruned.retained_by_prefix is None:
                raise ValueError(f"an energy budget needs retained energy per prefix ({name})")
            short.append((pruned.retained_by_prefix < energy).sum())
    counts = iter(torch.stack(short).tolist() if short else [])  # one host sync per batch
    return [[min(next(counts) + 1, len(p.order)) for _, _, p in picks] for picks in longest]


def _within(
    pruner: Pruner,
    image: ImageTokens,
    longest: Picks,
    ks: list[int],
    bounds: tuple[int, int],
    energy: float,
) -> Picks:
    """The crops' energy prefixes when they fit [lo, hi] with their rows, else fixed lo / hi."""
    lo, hi = bounds
    target = hi
    if energy < 1:
        picks = [
            (crop, tokens, pruner.prefix(pruned, tokens, k))
            for (crop, tokens, pruned), k in zip(longest, ks, strict=True)
        ]
        kept = kept_index(picks)
        used = len(kept) + len(kept_rows(image, kept))
        if lo <= used <= hi:
            return picks
        target = lo if used < lo else hi
    return search_on_picks(pruner, image, longest, target)
