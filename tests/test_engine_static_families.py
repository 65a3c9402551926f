"""The static KV cache and the compiled decode step for the newer families: keep-all through
the static, bucketed path (and the compiled decode: dynamo, eager backend on CPU) equals
stock `generate`, with Qwen3-VL's DeepStack rows, Gemma 3's token types and sliding-window
layers, InternVL's tiles."""

from __future__ import annotations

import pytest
from transformers import CompileConfig

from resprune.answer import answer_batch
from resprune.engines.hf import TransformersEngine
from tests.vlm_helpers import prepared, stock_generate, tiny_vlm

NEW = 5


@pytest.fixture(scope="module", params=["qwen3_vl", "gemma3", "internvl"])
def family(request, tmp_path_factory):
    vlm, pre = tiny_vlm(request.param, tmp_path_factory)
    return vlm, prepared(pre)


def test_keep_all_static_bucketed_equals_stock_generate(family):
    vlm, items = family
    engine = TransformersEngine(vlm, cache="static", bucket=True)
    results = answer_batch(vlm, items, pruner=None, keep=1.0, max_new_tokens=NEW, engine=engine)
    assert [r.answer_ids for r in results] == stock_generate(vlm, items, NEW)


@pytest.mark.slow
def test_compiled_decode_equals_stock_generate(family):
    vlm, items = family
    config = CompileConfig(backend="eager", mode=None, dynamic=False)
    engine = TransformersEngine(vlm, cache="static", compile=True, compile_config=config)
    results = answer_batch(vlm, items, pruner=None, keep=1.0, max_new_tokens=NEW, engine=engine)
    assert [r.answer_ids for r in results] == stock_generate(vlm, items, NEW)
    assert hasattr(vlm.model, "_compiled_call")  # transformers took the compiled decode path
