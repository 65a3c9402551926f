"""Gemma 3: keep-all equals stock generate; kept image tokens keep their token type and form
one bidirectional block; positions keep their gaps."""

from __future__ import annotations

import pytest
import torch

from resprune.answer import answer_batch
from resprune.pruners import build_pruner, resolve_keep
from tests.vlm_helpers import (
    assert_pruned_counts,
    captured_positions,
    original_1d_positions,
    real_rows,
    stock_generate,
    tiny_vlm_items,
)

NEW = 6


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return tiny_vlm_items("gemma3", tmp_path_factory)


@pytest.mark.parametrize("n", [1, 3])
def test_keep_all_equals_stock_generate(gemma, n):
    vlm, items = gemma
    results = answer_batch(vlm, items[:n], pruner=None, keep=16, max_new_tokens=NEW)
    assert [r.answer_ids for r in results] == stock_generate(vlm, items[:n], NEW)


def test_keep_a_quarter_shortens_the_prompt_by_what_was_dropped(gemma):
    vlm, items = gemma
    results = answer_batch(vlm, items, pruner=build_pruner("resprune"), keep=0.25, max_new_tokens=2)
    for r, it in zip(results, items, strict=True):
        assert r.kept_tokens == resolve_keep(0.25, r.visual_tokens) < r.visual_tokens
        assert_pruned_counts([r], [it], r.kept_tokens)


def _prefill_token_types(vlm, items, **kwargs):
    seen = []

    def hook(module, args, kw):
        if kw.get("token_type_ids") is not None:
            seen.append((kw["input_ids"].clone(), kw["token_type_ids"].clone()))

    handle = vlm.model.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        results = answer_batch(vlm, items, **kwargs)
    finally:
        handle.remove()
    return results, seen


def test_kept_image_tokens_keep_their_type_and_one_block(gemma):
    from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

    vlm, items = gemma
    results, seen = _prefill_token_types(
        vlm, items, pruner=build_pruner("resprune"), keep=10, max_new_tokens=3
    )
    assert len(seen) == 1  # prefill only: decode steps attend causally
    ids, types = seen[0]
    image = vlm.model.config.image_token_id
    assert torch.equal(types, (ids == image).long())
    blocks = get_block_sequence_ids_for_mask(types)
    for b, r in enumerate(results):
        row = blocks[b, -r.prompt_tokens :]
        assert (row == 0).sum() == r.kept_tokens and (row > 0).sum() == 0  # one block, whole
        assert int(types[b, : -r.prompt_tokens].sum()) == 0  # padding is text


def test_token_types_change_the_prefill(gemma):
    """The check above matters: without token types the same prompt gives other logits."""
    vlm, items = gemma
    it = items[0]
    ids = torch.from_numpy(it.input_ids)[None]
    pixels = torch.from_numpy(it.pixel_values)[None]
    types = (ids == vlm.model.config.image_token_id).long()
    with torch.no_grad():
        both = vlm.model(input_ids=ids, pixel_values=pixels, token_type_ids=types).logits
        causal = vlm.model(input_ids=ids, pixel_values=pixels).logits
    assert not torch.allclose(both[0, -1], causal[0, -1], atol=1e-4)


def test_original_positions_keep_gaps(gemma):
    vlm, items = gemma
    with captured_positions(vlm) as calls:
        results = answer_batch(
            vlm, items, pruner=build_pruner("resprune"), keep=12, max_new_tokens=2
        )
    image = vlm.model.config.image_token_id
    for b, (it, r) in enumerate(zip(items, results, strict=True)):
        rows = real_rows(calls[0], b, r.prompt_tokens)
        assert torch.equal(rows, original_1d_positions(it, r, image))
