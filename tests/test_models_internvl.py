"""InternVL: keep-all equals stock generate; the budget spans every tile and the thumbnail;
the prompt keeps its <img> / </img> delimiters and shortens by exactly what was dropped."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resprune.answer import answer_batch
from resprune.budget import split_budget
from resprune.pruners import build_pruner, resolve_keep
from tests.vlm_helpers import (
    assert_pruned_counts,
    captured_positions,
    original_1d_positions,
    real_rows,
    stock_generate,
    tiny_vlm_items,
)

NEW = 5


@pytest.fixture(scope="module")
def internvl(tmp_path_factory):
    return tiny_vlm_items("internvl", tmp_path_factory)


def test_prompt_and_tiles_are_internvls(internvl):
    vlm, items = internvl
    tok = vlm.tokenizer
    per_tile = vlm.model.config.image_seq_length
    tiles = [it.pixel_values.shape[0] for it in items]
    assert tiles[0] == 1 and max(tiles) > 2  # a square image, then tiled ones + thumbnail
    for it, n in zip(items, tiles, strict=True):
        ids = it.input_ids
        run = np.flatnonzero(ids == vlm.model.config.image_token_id)
        assert len(run) == n * per_tile and np.all(np.diff(run) == 1)
        assert ids[run[0] - 1] == tok.convert_tokens_to_ids("<img>")
        assert ids[run[-1] + 1] == tok.convert_tokens_to_ids("</img>")


@pytest.mark.parametrize("n", [1, 3])
def test_keep_all_equals_stock_generate(internvl, n):
    vlm, items = internvl
    results = answer_batch(vlm, items[:n], pruner=None, keep=16, max_new_tokens=NEW)
    assert [r.answer_ids for r in results] == stock_generate(vlm, items[:n], NEW)


def test_keep_a_quarter_shortens_the_prompt_by_what_was_dropped(internvl):
    vlm, items = internvl
    results = answer_batch(vlm, items, pruner=build_pruner("resprune"), keep=0.25, max_new_tokens=2)
    for r, it in zip(results, items, strict=True):
        assert r.kept_tokens == resolve_keep(0.25, r.visual_tokens) < r.visual_tokens
        assert_pruned_counts([r], [it], r.kept_tokens)


@pytest.mark.parametrize("pruner", ["resprune", "uniform"])
def test_tiles_and_thumbnail_share_the_budget(internvl, pruner):
    """Per image: every tile and the thumbnail get their share of keep (by size), no more."""
    vlm, items = internvl
    keep = 40
    results = answer_batch(vlm, items, pruner=build_pruner(pruner), keep=keep, max_new_tokens=1)
    per_tile = vlm.model.config.image_seq_length
    for it, r in zip(items, results, strict=True):
        tiles = it.pixel_values.shape[0]
        assert r.kept_tokens == keep
        counts = np.bincount(np.asarray(r.kept_indices) // per_tile, minlength=tiles)
        assert counts.tolist() == split_budget(keep, [per_tile] * tiles)
        assert counts[-1] > 0  # the thumbnail (last) is in the budget


def test_original_positions_keep_gaps(internvl):
    vlm, items = internvl
    with captured_positions(vlm) as calls:
        results = answer_batch(
            vlm, items, pruner=build_pruner("resprune"), keep=30, max_new_tokens=2
        )
    image = vlm.model.config.image_token_id
    for b, (it, r) in enumerate(zip(items, results, strict=True)):
        rows = real_rows(calls[0], b, r.prompt_tokens)
        assert torch.equal(rows.flatten(), original_1d_positions(it, r, image))
