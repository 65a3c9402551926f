"""LLaVA-NeXT's budget: kept tokens plus the newlines of their rows fit keep, for every pruner."""

from __future__ import annotations

import pytest
import torch

from resprune.budget import ImageTokens, largest_shares, select_within_budget, split_budget
from resprune.models.base import Crop
from resprune.pruners import PRUNERS, TokenSet, build_pruner

ROWS, COLS = 8, 10


def grid_with_newlines(seed: int = 0) -> ImageTokens:
    """A packed 8x10 grid, each row followed by one newline token (as LLaVA-NeXT packs it)."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(ROWS * (COLS + 1), 16, generator=g)
    token_pos = [r * (COLS + 1) + c for r in range(ROWS) for c in range(COLS)]
    newlines = [
        (r * (COLS + 1) + COLS, torch.arange(r * (COLS + 1), r * (COLS + 1) + COLS))
        for r in range(ROWS)
    ]
    return ImageTokens(feats, [Crop(torch.tensor(token_pos), (ROWS, COLS))], newlines, key="x")


def used_tokens(pruner, image: ImageTokens, k: int) -> int:
    """Tokens the LLM sees when ``k`` are selected: picks plus one newline per row hit."""
    crop = image.crops[0]
    pruned = pruner.prune([TokenSet(image.features[crop.index], crop.grid, key="x#0")], [k])[0]
    rows = {int(i) // COLS for i in pruned.indices}  # grid position -> row, counted by hand
    return len(pruned.indices) + len(rows)


@pytest.mark.parametrize("method", [m for m in PRUNERS if m != "none"])
@pytest.mark.parametrize("keep", [5, 47, 0.3])
def test_kept_plus_newlines_fit_keep_and_fill_it(method, keep):
    image = grid_with_newlines()
    pruner = build_pruner(method)
    target = keep if isinstance(keep, int) else round(keep * image.features.shape[0])
    (picks,) = select_within_budget(pruner, keep, [image])
    idx = picks[0][2].indices
    used = len(idx) + len({int(i) // COLS for i in idx})
    assert used <= target
    if method != "pool":  # pool may keep fewer than asked: its budget is not a token count
        assert used == target or used_tokens(pruner, image, len(idx) + 1) > target


def test_keep_all_keeps_every_token_and_newline():
    image = grid_with_newlines()
    (picks,) = select_within_budget(build_pruner("resprune"), 1.0, [image])
    assert len(picks[0][2].indices) == ROWS * COLS


def test_images_without_layout_rows_select_exactly_k_in_one_call():
    calls = []
    pruner = build_pruner("uniform")
    prune = pruner.prune
    pruner.prune = lambda sets, ks: calls.append(ks) or prune(sets, ks)
    feats = grid_with_newlines().features[: ROWS * COLS]
    plain = ImageTokens(feats, [Crop(torch.arange(ROWS * COLS), (ROWS, COLS))])
    (picks,) = select_within_budget(pruner, 17, [plain])
    assert len(picks[0][2].indices) == 17 and calls == [[17]]


def llava_next_like(seed: int, base: int, tiles: list[tuple[int, int]]) -> ImageTokens:
    """Base view (base x base, no newlines), then tiles side by side, each packed row closed
    by a newline (as LLaVA-NeXT packs the unpadded high-res grid); tiles (rows, cols) differ."""
    g = torch.Generator().manual_seed(seed)
    rows, width = tiles[0][0], sum(c for _, c in tiles)
    n = base * base + rows * (width + 1)
    feats = torch.randn(n, 12, generator=g)
    crops = [Crop(torch.arange(base * base), (base, base))]
    start = [base * base + r * (width + 1) for r in range(rows)]
    left = 0
    for _, cols in tiles:
        index = torch.tensor([s + left + c for s in start for c in range(cols)])
        crops.append(Crop(index, (rows, cols)))
        left += cols
    newlines = [(s + width, torch.arange(s, s + width)) for s in start]
    return ImageTokens(feats, crops, newlines, text=torch.randn(3, 12, generator=g), key=str(seed))


class CountedPruner:
    """Forwards to ``inner``, counting calls; ``prefix_consistent`` may be switched off to
    force the one-call-per-round search, the reference for the one-call path."""

    def __init__(self, inner, prefix_consistent: bool):
        self.inner, self.name, self.calls = inner, inner.name, 0
        self.prefix_consistent = prefix_consistent

    def prune(self, sets, ks):
        self.calls += 1
        return self.inner.prune(sets, ks)

    def prefix(self, pruned, tokens, k):
        return self.inner.prefix(pruned, tokens, k)


MIXED = [
    llava_next_like(1, 4, [(6, 5), (6, 4), (6, 2)]),
    llava_next_like(2, 3, [(5, 7), (5, 3)]),
    llava_next_like(3, 4, [(4, 4)]),
    ImageTokens(torch.randn(30, 12), [Crop(torch.arange(30), (5, 6))], key="plain"),
]


@pytest.mark.parametrize("method", PRUNERS)
@pytest.mark.parametrize("keep", [1, 7, 26, 0.15, 0.4, 1.0])
def test_one_call_search_picks_what_the_search_by_calls_picks(method, keep):
    inner = build_pruner(method)
    fast = CountedPruner(inner, getattr(inner, "prefix_consistent", False))
    reference = CountedPruner(inner, False)
    for batch in (MIXED, MIXED[:1], MIXED[1:3]):
        got = select_within_budget(fast, keep, batch)
        want = select_within_budget(reference, keep, batch)
        for got_image, want_image in zip(got, want, strict=True):
            assert [c for c, _, _ in got_image] == [c for c, _, _ in want_image]
            for (_, _, g), (_, _, w) in zip(got_image, want_image, strict=True):
                assert torch.equal(g.indices, w.indices)
                assert g.retained_energy == pytest.approx(w.retained_energy, abs=1e-5)
                assert (g.relevance is None) == (w.relevance is None)
                if g.relevance is not None:
                    assert torch.equal(g.relevance, w.relevance)


@pytest.mark.parametrize("method", ["resprune", "divprune"])
def test_prefix_consistent_pruners_search_with_one_call(method):
    pruner = build_pruner(method)
    calls = []
    prune = pruner.prune
    pruner.prune = lambda sets, ks: calls.append(ks) or prune(sets, ks)
    by_calls = CountedPruner(build_pruner(method), False)
    select_within_budget(by_calls, 0.3, MIXED)
    select_within_budget(pruner, 0.3, MIXED)
    assert by_calls.calls > 1  # the search needs several rounds on these images
    assert len(calls) == 1


def test_largest_shares_cover_every_smaller_budget_though_splits_are_not_monotone():
    sizes = [1, 3, 3]
    assert split_budget(3, sizes) == [1, 1, 1] and split_budget(4, sizes) == [0, 2, 2]
    assert largest_shares(4, sizes) == [1, 2, 2]
    assert largest_shares(1, [5, 9]) == [0, 1]


@pytest.mark.parametrize("method", ["resprune", "divprune"])
def test_prefix_beyond_the_picks_made_is_refused(method):
    pruner = build_pruner(method)
    tokens = TokenSet(torch.randn(12, 8, generator=torch.Generator().manual_seed(0)))
    (pruned,) = pruner.prune([tokens], [4])
    assert torch.equal(
        pruner.prefix(pruned, tokens, 3).indices, pruner.prune([tokens], [3])[0].indices
    )
    with pytest.raises(ValueError, match="prefix of 5 picks"):
        pruner.prefix(pruned, tokens, 5)
