"""Qwen3-VL (dense and MoE): keep-all equals stock generate; pruned tokens keep their M-RoPE
positions and exactly their own DeepStack rows, in every level."""

from __future__ import annotations

import pytest
import torch

from resprune.answer import answer_batch
from resprune.pruners import build_pruner, resolve_keep
from tests.vlm_helpers import (
    assert_pruned_counts,
    captured_positions,
    real_rows,
    stock_generate,
    tiny_vlm_items,
)

NEW = 5


@pytest.fixture(
    scope="module",
    params=["qwen3_vl", pytest.param("qwen3_vl_moe", marks=pytest.mark.slow)],  # MoE: slow CPU
)
def qwen3(request, tmp_path_factory):
    return tiny_vlm_items(request.param, tmp_path_factory)


@pytest.mark.parametrize("n", [1, 3])
def test_keep_all_equals_stock_generate(qwen3, n):
    vlm, items = qwen3
    assert len({tuple(it.image_grid_thw) for it in items[:n]}) == n  # different grids
    results = answer_batch(vlm, items[:n], pruner=None, keep=32, max_new_tokens=NEW)
    assert [r.answer_ids for r in results] == stock_generate(vlm, items[:n], NEW)


def test_keep_a_quarter_shortens_the_prompt_by_what_was_dropped(qwen3):
    vlm, items = qwen3
    results = answer_batch(vlm, items, pruner=build_pruner("resprune"), keep=0.25, max_new_tokens=2)
    for r, it in zip(results, items, strict=True):
        assert r.kept_tokens == resolve_keep(0.25, r.visual_tokens) < r.visual_tokens
        assert_pruned_counts([r], [it], r.kept_tokens)


def test_deepstack_levels_are_pruned_by_the_kept_index(qwen3):
    """What the LLM's first layers receive: in every level, exactly the kept tokens' rows of
    the stock vision tower's DeepStack features, at the kept image positions only."""
    vlm, items = qwen3
    model = vlm.model
    seen = {}

    def hook(module, args, kwargs):
        if kwargs.get("deepstack_visual_embeds") is not None:
            seen["embeds"] = [e.clone() for e in kwargs["deepstack_visual_embeds"]]
            seen["mask"] = kwargs["visual_pos_masks"].clone()
            seen["embeds_in"] = kwargs["inputs_embeds"].shape

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        results = answer_batch(
            vlm, items, pruner=build_pruner("resprune"), keep=20, max_new_tokens=2
        )
    finally:
        handle.remove()
    levels = len(model.config.vision_config.deepstack_visual_indexes)
    assert levels >= 2 and len(seen["embeds"]) == levels
    want = [[] for _ in range(levels)]
    with torch.no_grad():
        for it, r in zip(items, results, strict=True):
            out = model.model.get_image_features(
                pixel_values=torch.from_numpy(it.pixel_values),
                image_grid_thw=torch.from_numpy(it.image_grid_thw)[None],
                return_dict=True,
            )
            kept = torch.tensor(r.kept_indices)
            for level in range(levels):
                want[level].append(out.deepstack_features[level][0][kept])
    for level in range(levels):
        assert torch.allclose(seen["embeds"][level], torch.cat(want[level]), atol=1e-5)
    assert int(seen["mask"].sum()) == sum(r.kept_tokens for r in results)
    for b, r in enumerate(results):  # the mask marks this row's kept image run, nothing else
        row = seen["mask"][b, -r.prompt_tokens :]
        assert int(row.sum()) == r.kept_tokens
        assert not seen["mask"][b, : -r.prompt_tokens].any()


@pytest.mark.parametrize("method", ["pool", "uniform"])
def test_baselines_carry_deepstack_rows(qwen3, method):
    """Baselines run with DeepStack (pool: its tokens take their windows' centres' rows)."""
    vlm, items = qwen3
    results = answer_batch(vlm, items, pruner=build_pruner(method), keep=16, max_new_tokens=2)
    assert all(r.kept_tokens <= 16 and r.new_tokens >= 1 for r in results)


def test_original_positions_are_the_unpruned_mrope_positions(qwen3):
    vlm, items = qwen3
    with captured_positions(vlm) as calls:
        results = answer_batch(
            vlm, items, pruner=build_pruner("resprune"), keep=12, max_new_tokens=2
        )
    for b, (it, r) in enumerate(zip(items, results, strict=True)):
        ids = torch.from_numpy(it.input_ids)[None]
        image = (ids == vlm.model.config.image_token_id).int()
        grid = torch.from_numpy(it.image_grid_thw)[None]
        full, _ = vlm.model.model.get_rope_index(ids, image, image_grid_thw=grid)
        run = torch.nonzero(image[0])[:, 0]
        keep = torch.ones(ids.shape[1], dtype=torch.bool)
        keep[run] = False
        keep[run[torch.tensor(r.kept_indices)]] = True
        rows = real_rows(calls[0], b, r.prompt_tokens)
        assert torch.equal(rows[1:], full[:, 0, keep])
        assert torch.equal(rows[0], torch.arange(r.prompt_tokens))


@pytest.mark.slow
def test_mixed_batch_equals_one_by_one(qwen3):
    vlm, items = qwen3
    pruner = build_pruner("resprune")
    batch = answer_batch(vlm, items, pruner=pruner, keep=16, max_new_tokens=NEW)
    alone = [answer_batch(vlm, [it], pruner=pruner, keep=16, max_new_tokens=NEW)[0] for it in items]
    assert [r.answer_ids for r in batch] == [r.answer_ids for r in alone]
