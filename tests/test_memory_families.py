"""The memory model's terms for the newer families: Qwen3-VL's DeepStack levels, InternVL's
tiles and thumbnail, Gemma 3's one pooled tile; and the worked example for Qwen3-VL-8B on an
80 GB H100, from its real config built offline (bench/RESULTS.md)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from resprune.memory import BatchMemory, BatchShape, batch_token_budget
from tests.vlm_helpers import prepared, tiny_vlm


@pytest.mark.parametrize("family", ["qwen3_vl", "internvl", "gemma3"])
def test_items_features_and_selection_sets_are_what_the_adapter_makes(family, tmp_path_factory):
    """Feature bytes (DeepStack rows included) and the selector's sets and their sizes, against
    what encode and layout really produce for these images."""
    vlm, pre = tiny_vlm(family, tmp_path_factory)
    items = prepared(pre)
    memory = BatchMemory(vlm.model.config, vlm.model.dtype, max_new_tokens=4)
    with torch.no_grad():
        encoded = vlm.adapter.encode(vlm.model, items)
    for i, it in enumerate(items):
        feat = encoded.features[i]
        side = encoded.side[i] if encoded.side else feat[:0]
        est = memory.item(it, cost=10, keep=8)
        assert est.features == (feat.numel() + side.numel()) * feat.element_size()
        crops = vlm.adapter.layout(vlm.model, it, feat.shape[0]).crops
        assert est.sets == len(crops)
        assert est.set_tokens == max(len(c.index) for c in crops)
    if family == "qwen3_vl":
        levels = len(vlm.model.config.vision_config.deepstack_visual_indexes)
        assert encoded.side[0].shape[1] == levels >= 2


def test_internvl_tower_counts_every_tile_and_the_thumbnail(tmp_path_factory):
    vlm, pre = tiny_vlm("internvl", tmp_path_factory)
    one, tiled = prepared(pre)[:2]
    tiles = tiled.pixel_values.shape[0]
    assert one.pixel_values.shape[0] == 1 and tiles > 2
    memory = BatchMemory(vlm.model.config, vlm.model.dtype, max_new_tokens=4)
    a, b = (memory.item(it, cost=10, keep=None) for it in (one, tiled))
    assert b.tower == tiles * a.tower


def qwen3_vl_8b_config():
    """Qwen/Qwen3-VL-8B-Instruct's config, built offline (no weights)."""
    from transformers import Qwen3VLConfig

    rope = {"rope_type": "default", "rope_theta": 5_000_000, "mrope_interleaved": True}
    return Qwen3VLConfig(
        text_config={
            "vocab_size": 151936,
            "hidden_size": 4096,
            "intermediate_size": 12288,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "max_position_embeddings": 262144,
            "rope_parameters": rope | {"mrope_section": [24, 20, 20]},
        },
        vision_config={
            "depth": 27,
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_heads": 16,
            "out_hidden_size": 4096,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": 2304,
            "deepstack_visual_indexes": [8, 16, 24],
        },
        image_token_id=151655,
    )


def photo_item(text_tokens: int = 60):
    """A 4032 x 3024 photo at the default model.max_pixels: 864 x 1152 px, 972 merged tokens
    (3,888 patches of 16 px)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    h, w = smart_resize(3024, 4032, factor=32, min_pixels=65536, max_pixels=1280 * 28 * 28)
    assert (h, w) == (864, 1152)
    merged, patches = h * w // 32**2, h * w // 16**2
    ids = np.concatenate([np.full(merged, 151655), np.arange(text_tokens)])
    return SimpleNamespace(input_ids=ids, pixel_values=np.zeros((patches, 1536), np.float32))


H100_FREE = 80_000_000_000 - 17_500_000_000 - 600_000_000  # 80 GB less bf16 weights, context


def test_worked_example_h100_qwen3_vl_8b():
    """keep 64 of 972 tokens: the LLM-only rule would pack ~1,250 items; the whole-batch
    estimate, vision tower, pixel tensors and DeepStack mergers included, packs 125 and fits."""
    config = qwen3_vl_8b_config()
    memory = BatchMemory(config, torch.bfloat16, max_new_tokens=32)
    budget = int(H100_FREE * (1 - 0.15))
    cost = 60 + 64 + 32
    llm_only = batch_token_budget(H100_FREE, config.text_config, torch.bfloat16) // cost
    item = memory.item(photo_item(), cost=cost, keep=64)
    n = memory.largest_batch(budget, item)
    assert 1200 < llm_only < 1300 and n == 125
    shape = BatchShape()
    for _ in range(n):
        shape = memory.add(shape, item)
    parts = memory.parts(shape)
    assert memory.bytes(shape) <= budget < memory.bytes(memory.add(shape, item))
    assert parts["vision"] == max(parts["vision"], parts["selection"], parts["prefill"])
    # the DeepStack rows: 3 levels as wide as the features, 4 x the features' bytes in all
    assert item.features == 972 * 4096 * 2 * 4
    unpruned = memory.item(photo_item(), cost=60 + 972 + 32, keep=None)
    assert memory.largest_batch(budget, unpruned) == 90
