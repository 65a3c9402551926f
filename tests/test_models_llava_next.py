"""LLaVA-NeXT: keep-all equals stock generate; anyres budgets, image_newline rows, positions."""

from __future__ import annotations

import pytest
import torch

from resprune.answer import answer_batch
from resprune.pruners import build_pruner
from tests.vlm_helpers import (
    assert_pruned_counts,
    captured_positions,
    original_1d_positions,
    real_rows,
    stock_generate,
    tiny_vlm_items,
)

NEW = 6
BASE = 576  # (336 / 14) ** 2 tokens of the base view


@pytest.fixture(scope="module")
def next_model(tmp_path_factory):
    return tiny_vlm_items("llava_next", tmp_path_factory)


def newline_positions(vlm, item) -> list[int]:
    """Packed indices whose feature is the model's image_newline vector (found independently)."""
    feats = vlm.model.model.get_image_features(
        pixel_values=torch.from_numpy(item.pixel_values),
        image_sizes=torch.from_numpy(item.image_sizes)[None],
        return_dict=True,
    ).pooler_output[0]
    hit = (feats == vlm.model.model.image_newline).all(-1)
    return torch.nonzero(hit).flatten().tolist()


@pytest.mark.parametrize("n", [1, 3])
def test_keep_all_equals_stock_generate(next_model, n):
    vlm, items = next_model
    assert len({tuple(it.image_sizes) for it in items[:n]}) == n  # different anyres grids
    results = answer_batch(vlm, items[:n], pruner=None, keep=64, max_new_tokens=NEW)
    assert [r.answer_ids for r in results] == stock_generate(vlm, items[:n], NEW)
    assert all(r.kept_tokens == r.visual_tokens for r in results)


@pytest.mark.parametrize("anyres", ["per_crop", "global"])
def test_pruned_counts_and_newline_rows(next_model, anyres):
    vlm, items = next_model
    results = answer_batch(
        vlm, items, pruner=build_pruner("resprune"), keep=60, max_new_tokens=2, anyres=anyres
    )
    newlines = [newline_positions(vlm, it) for it in items]
    assert all(len(nl) > 0 for nl in newlines)
    assert_pruned_counts(results, items, 60)
    assert any(r.kept_newlines > 0 for r in results)
    for r, nl in zip(results, newlines, strict=True):
        kept = set(r.kept_indices)
        starts = [BASE, *(p + 1 for p in nl[:-1])]
        expected = {p for s, p in zip(starts, nl, strict=True) if kept & set(range(s, p))}
        assert kept & set(nl) == expected  # a newline stays iff its row keeps a token
        assert r.kept_newlines == len(expected)


def test_per_crop_budget_is_proportional(next_model):
    vlm, items = next_model
    item = items[1]  # 300x451: base view + 1x2 tiles
    (r,) = answer_batch(vlm, [item], pruner=build_pruner("resprune"), keep=90, max_new_tokens=1)
    selectable = r.visual_tokens - len(newline_positions(vlm, item))
    selected = r.kept_tokens - r.kept_newlines  # the selection budget left after the rows
    in_base = sum(1 for i in r.kept_indices if i < BASE)
    assert abs(in_base - selected * BASE / selectable) <= 1


def test_original_positions_keep_gaps(next_model):
    vlm, items = next_model
    with captured_positions(vlm) as calls:
        results = answer_batch(
            vlm, items, pruner=build_pruner("resprune"), keep=50, max_new_tokens=2
        )
    for b, (it, r) in enumerate(zip(items, results, strict=True)):
        expected = original_1d_positions(it, r, vlm.model.config.image_token_id)
        assert torch.equal(real_rows(calls[0], b, r.prompt_tokens), expected)
        assert int(calls[1][b, -1]) == r.prompt_tokens_unpruned


def test_contiguous_positions(next_model):
    vlm, items = next_model
    with captured_positions(vlm) as calls:
        results = answer_batch(
            vlm,
            items,
            pruner=build_pruner("uniform"),
            keep=50,
            max_new_tokens=1,
            position_policy="contiguous",
        )
    for b, r in enumerate(results):
        assert torch.equal(real_rows(calls[0], b, r.prompt_tokens), torch.arange(r.prompt_tokens))


@pytest.mark.parametrize("anyres", ["per_crop", "global"])
def test_mixed_batch_equals_one_by_one(next_model, anyres):
    vlm, items = next_model
    pruner = build_pruner("resprune")
    kw = {"pruner": pruner, "keep": 0.05, "max_new_tokens": NEW, "anyres": anyres}
    batch = answer_batch(vlm, items, **kw)
    alone = [answer_batch(vlm, [it], **kw)[0] for it in items]
    assert [r.answer_ids for r in batch] == [r.answer_ids for r in alone]
    assert [r.kept_indices for r in batch] == [r.kept_indices for r in alone]


def test_unknown_anyres_mode_raises(next_model):
    vlm, items = next_model
    with pytest.raises(ValueError, match="anyres"):
        answer_batch(vlm, items, pruner=None, keep=8, max_new_tokens=1, anyres="tiles")
