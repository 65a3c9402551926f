"""The static KV cache and the compiled decode step for the newer families: keep-all through
the static, bucketed path (and the compiled decode: dynamo, eager backend on CPU) equals
stock `generate`, with Qwen3-VL's DeepStack rows, Gemma 3's token types and sliding-window
layers, InternVL's tiles."""

from __future__ import annotations

import pytest

from resprune.answer import answer_batch
from resprune.engines.hf import TransformersEngine
from tests.vlm_helpers import compiled_decode_answers, stock_generate, tiny_vlm_items

NEW = 5


@pytest.fixture(scope="module", params=["qwen3_vl", "gemma3", "internvl"])
def family(request, tmp_path_factory):
    return tiny_vlm_items(request.param, tmp_path_factory)


def test_keep_all_static_bucketed_equals_stock_generate(family):
    vlm, items = family
    engine = TransformersEngine(vlm, cache="static", bucket=True)
    results = answer_batch(vlm, items, pruner=None, keep=1.0, max_new_tokens=NEW, engine=engine)
    assert [r.answer_ids for r in results] == stock_generate(vlm, items, NEW)


@pytest.mark.slow
def test_compiled_decode_equals_stock_generate(family):
    vlm, items = family
    compiled_decode_answers(vlm, items, NEW)
