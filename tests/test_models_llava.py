"""LLaVA-1.5: keep-all equals stock generate; pruned counts, positions, batching, item errors."""

from __future__ import annotations

import copy

import pytest
import torch

from resprune.answer import answer_batch
from resprune.items import ItemError, ItemResult
from resprune.pruners import build_pruner
from tests.vlm_helpers import (
    assert_pruned_counts,
    captured_positions,
    images,
    original_1d_positions,
    prepared,
    real_rows,
    stock_generate,
    tiny_vlm,
)

NEW = 6


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    vlm, pre = tiny_vlm("llava", tmp_path_factory)
    return vlm, pre, prepared(pre)


@pytest.mark.parametrize("n", [1, 3])
def test_keep_all_equals_stock_generate(llava, n):
    vlm, _, items = llava
    results = answer_batch(vlm, items[:n], pruner=None, keep=64, max_new_tokens=NEW)
    assert [r.answer_ids for r in results] == stock_generate(vlm, items[:n], NEW)
    assert all(r.kept_tokens == r.visual_tokens == 576 for r in results)
    assert all(r.prompt_tokens == r.prompt_tokens_unpruned for r in results)


@pytest.mark.parametrize("keep,k", [(64, 64), (0.25, 144)])
def test_pruned_counts_and_prompt_lengths(llava, keep, k):
    vlm, _, items = llava
    results = answer_batch(vlm, items, pruner=build_pruner("resprune"), keep=keep, max_new_tokens=2)
    assert_pruned_counts(results, items, k)
    # items 0 and 1 have content words, so relevance was computed for them
    assert results[0].relevance_max is not None and results[1].relevance_mean is not None
    assert all(r.vision_s > 0 and r.select_s > 0 and r.generate_s > 0 for r in results)


def test_original_positions_keep_gaps(llava):
    vlm, _, items = llava
    with captured_positions(vlm) as calls:
        results = answer_batch(
            vlm, items, pruner=build_pruner("resprune"), keep=48, max_new_tokens=3
        )
    prefill, first_decode = calls[0], calls[1]
    for b, (it, r) in enumerate(zip(items, results, strict=True)):
        expected = original_1d_positions(it, r, vlm.model.config.image_token_id)
        assert torch.equal(real_rows(prefill, b, r.prompt_tokens), expected)
        assert (
            int(first_decode[b, -1]) == r.prompt_tokens_unpruned
        )  # decode continues after the gap


def test_contiguous_positions(llava):
    vlm, _, items = llava
    with captured_positions(vlm) as calls:
        results = answer_batch(
            vlm,
            items,
            pruner=build_pruner("resprune"),
            keep=48,
            max_new_tokens=2,
            position_policy="contiguous",
        )
    for b, r in enumerate(results):
        assert torch.equal(real_rows(calls[0], b, r.prompt_tokens), torch.arange(r.prompt_tokens))
        assert int(calls[1][b, -1]) == r.prompt_tokens


@pytest.mark.parametrize("method", ["resprune", "pool", "uniform"])
def test_mixed_batch_equals_one_by_one(llava, method):
    vlm, _, items = llava
    pruner = build_pruner(method)
    batch = answer_batch(vlm, items, pruner=pruner, keep=40, max_new_tokens=NEW)
    alone = [answer_batch(vlm, [it], pruner=pruner, keep=40, max_new_tokens=NEW)[0] for it in items]
    assert [r.answer_ids for r in batch] == [r.answer_ids for r in alone]
    assert [r.kept_indices for r in batch] == [r.kept_indices for r in alone]


def test_prompt_too_long_is_an_item_error(llava, monkeypatch):
    vlm, pre, items = llava
    long_item = pre.prepare(images()[0], "describe the red car " * 40)
    assert len(long_item.input_ids) > len(items[0].input_ids) + 100
    monkeypatch.setattr(vlm.model.config.text_config, "max_position_embeddings", 620)
    batch = [items[0], long_item, items[2]]
    out = answer_batch(vlm, batch, pruner=None, keep=64, max_new_tokens=NEW)
    assert isinstance(out[1], ItemError) and out[1].cause == "prompt_too_long"
    assert isinstance(out[0], ItemResult) and isinstance(out[2], ItemResult)
    alone = answer_batch(vlm, [items[0], items[2]], pruner=None, keep=64, max_new_tokens=NEW)
    assert [out[0].answer_ids, out[2].answer_ids] == [r.answer_ids for r in alone]


def test_bad_arguments_raise(llava):
    vlm, _, items = llava
    with pytest.raises(ValueError, match="position_policy"):
        answer_batch(vlm, items, pruner=None, keep=8, max_new_tokens=1, position_policy="x")
    assert answer_batch(vlm, [], pruner=None, keep=8, max_new_tokens=1) == []


def test_random_mask_follows_the_item_id_not_the_batch(llava):
    vlm, _, items = llava
    a, b = (copy.deepcopy(items[0]) for _ in range(2))
    a.item_id, b.item_id = "item-a", "item-b"  # the same image under two ids
    kw = {"pruner": build_pruner("random", seed=5), "keep": 32, "max_new_tokens": 1}
    alone = answer_batch(vlm, [a], **kw)[0].kept_indices
    batch = answer_batch(vlm, [items[1], b, a], **kw)
    assert batch[2].kept_indices == alone  # same id: same mask, whatever the batch
    assert batch[1].kept_indices != alone  # another id: another mask
