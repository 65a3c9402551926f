"""LLaVA-NeXT's budget: kept tokens plus the newlines of their rows fit keep, for every pruner."""

from __future__ import annotations

import pytest
import torch

from resprune.budget import ImageTokens, select_within_budget
from resprune.models.base import Crop
from resprune.pruners import PRUNERS, TokenSet, build_pruner

ROWS, COLS = 8, 10


def grid_with_newlines(seed: int = 0) -> ImageTokens:
    """A packed 8x10 grid, each row followed by one newline token (as LLaVA-NeXT packs it)."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(ROWS * (COLS + 1), 16, generator=g)
    token_pos = [r * (COLS + 1) + c for r in range(ROWS) for c in range(COLS)]
    newlines = [(r * (COLS + 1) + COLS, torch.arange(r * (COLS + 1), r * (COLS + 1) + COLS))
                for r in range(ROWS)]  # fmt: skip
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
