"""Qwen2.5-VL: keep-all equals stock generate; pruned tokens keep their 3-D M-RoPE positions."""

from __future__ import annotations

import pytest
import torch

from resprune.answer import answer_batch
from resprune.pruners import build_pruner
from tests.vlm_helpers import (
    assert_pruned_counts,
    captured_positions,
    real_rows,
    stock_generate,
    tiny_vlm_items,
)

NEW = 6


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return tiny_vlm_items("qwen2_5_vl", tmp_path_factory)


def expected_mrope(item, result, image_token_id: int) -> torch.Tensor:
    """(t, row, col) positions of the kept prompt, written out from the M-RoPE rule."""
    ids = torch.from_numpy(item.input_ids)
    start = int(torch.nonzero(ids == image_token_id)[0])
    _, h, w = (int(v) // m for v, m in zip(item.image_grid_thw, (1, 2, 2), strict=True))
    n = result.visual_tokens
    before = torch.arange(start).expand(3, -1)
    kept = torch.tensor(result.kept_indices)
    image = torch.stack([torch.full_like(kept, start), start + kept // w, start + kept % w])
    after = start + max(h, w) + torch.arange(len(ids) - start - n).expand(3, -1)
    return torch.cat([before, image, after], dim=1)


@pytest.mark.parametrize("n", [1, 3])
def test_keep_all_equals_stock_generate(qwen, n):
    vlm, items = qwen
    assert len({tuple(it.image_grid_thw) for it in items[:n]}) == n  # different grids
    results = answer_batch(vlm, items[:n], pruner=None, keep=32, max_new_tokens=NEW)
    assert [r.answer_ids for r in results] == stock_generate(vlm, items[:n], NEW)
    # and again: cached rope_deltas from the stock run must not leak into ours
    again = answer_batch(vlm, items[:n], pruner=None, keep=32, max_new_tokens=NEW)
    assert [r.answer_ids for r in again] == [r.answer_ids for r in results]


def test_pruned_counts_and_prompt_lengths(qwen):
    vlm, items = qwen
    results = answer_batch(vlm, items, pruner=build_pruner("resprune"), keep=40, max_new_tokens=2)
    assert_pruned_counts(results, items, 40)


def test_original_positions_are_the_unpruned_mrope_positions(qwen):
    vlm, items = qwen
    with captured_positions(vlm) as calls:
        results = answer_batch(
            vlm, items, pruner=build_pruner("resprune"), keep=30, max_new_tokens=2
        )
    prefill, decode = calls[0], calls[1]
    assert prefill.shape[0] == 4  # text row + (t, h, w)
    for b, (it, r) in enumerate(zip(items, results, strict=True)):
        rows = real_rows(prefill, b, r.prompt_tokens)
        assert torch.equal(rows[0], torch.arange(r.prompt_tokens))
        expected = expected_mrope(it, r, vlm.model.config.image_token_id)
        assert torch.equal(rows[1:], expected)
        assert decode[1:, b, -1].tolist() == [int(expected.max()) + 1] * 3


def test_contiguous_positions(qwen):
    vlm, items = qwen
    with captured_positions(vlm) as calls:
        results = answer_batch(
            vlm,
            items,
            pruner=build_pruner("resprune"),
            keep=30,
            max_new_tokens=1,
            position_policy="contiguous",
        )
    for b, r in enumerate(results):
        rows = real_rows(calls[0], b, r.prompt_tokens)
        assert torch.equal(rows, torch.arange(r.prompt_tokens).expand(4, -1))


def test_mixed_batch_equals_one_by_one(qwen):
    vlm, items = qwen
    pruner = build_pruner("resprune")
    batch = answer_batch(vlm, items, pruner=pruner, keep=24, max_new_tokens=NEW)
    alone = [answer_batch(vlm, [it], pruner=pruner, keep=24, max_new_tokens=NEW)[0] for it in items]
    assert [r.answer_ids for r in batch] == [r.answer_ids for r in alone]


def test_host_mrope_positions_equal_the_models_rope_index(qwen):
    """Positions are built on the host (no device read); they are get_rope_index's."""
    from resprune.models.qwen2_5_vl import mrope_positions

    vlm, items = qwen
    for it in items:
        ids = torch.from_numpy(it.input_ids)[None]
        image = (ids == vlm.model.config.image_token_id).int()
        grid = torch.from_numpy(it.image_grid_thw)[None]
        want, _ = vlm.model.model.get_rope_index(ids, image, image_grid_thw=grid)
        assert torch.equal(torch.from_numpy(mrope_positions(vlm.model, it)), want[:, 0])
