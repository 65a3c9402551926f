"""The memory budget: KV and activation bytes per token by hand, and what it packs."""

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig

from pipeline.spec import ExecutionSpec
from pipeline.stages.answer import pack
from resprune.memory import (
    DEFAULT_CPU_BATCH_TOKENS,
    activation_bytes_per_token,
    batch_token_budget,
    kv_bytes_per_token,
    resolve_batch_tokens,
)

TINY = LlamaConfig(
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
)
LLAVA_7B = LlamaConfig(
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    intermediate_size=11008,
)


def test_budget_arithmetic_by_hand():
    # head_dim 64 / 4 = 16; K and V; bf16 = 2 bytes: 3 * 2 * 16 * 2 * 2 = 384
    assert kv_bytes_per_token(TINY, torch.bfloat16) == 384
    assert kv_bytes_per_token(TINY, torch.float32) == 768
    assert activation_bytes_per_token(TINY, torch.bfloat16) == (6 * 64 + 3 * 128) * 2  # 1536
    # 10 MiB free, 15 % kept back: 8_912_896 bytes / (384 + 1536) bytes per token
    assert batch_token_budget(10 * 2**20, TINY, torch.bfloat16) == 4642
    # LLaVA-1.5-7B in fp16: the well-known 0.5 MiB of KV cache per token
    assert kv_bytes_per_token(LLAVA_7B, torch.float16) == 2**19


def test_explicit_head_dim_and_grouped_kv_heads():
    qwen_like = SimpleNamespace(
        hidden_size=3584,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        head_dim=128,
        intermediate_size=18944,
    )
    assert kv_bytes_per_token(qwen_like, torch.bfloat16) == 28 * 4 * 128 * 2 * 2


def test_resolve_keeps_explicit_numbers_and_falls_back_on_cpu():
    model = SimpleNamespace(config=SimpleNamespace(text_config=TINY), dtype=torch.float32)
    cpu = torch.device("cpu")
    assert resolve_batch_tokens(5000, model, cpu) == 5000
    assert resolve_batch_tokens(None, model, cpu) is None
    assert resolve_batch_tokens("auto", model, cpu) == DEFAULT_CPU_BATCH_TOKENS


def test_pruned_items_pack_several_times_more_per_batch():
    """Same H100-sized budget; LLaVA-1.5 items: 60 text + 576 or 64 visual + 32 new tokens."""
    budget = batch_token_budget(66 * 2**30, LLAVA_7B, torch.bfloat16)  # 80 GB minus weights
    unpruned = pack([60 + 576 + 32] * 2000, budget=budget, max_items=4096)
    pruned = pack([60 + 64 + 32] * 2000, budget=budget, max_items=4096)
    per_batch = len(pruned[0]) / len(unpruned[0])
    assert len(unpruned[0]) > 50
    assert per_batch == pytest.approx((60 + 576 + 32) / (60 + 64 + 32), rel=0.02)  # ~4.3x


def test_spec_accepts_auto_and_ints_only():
    assert ExecutionSpec(max_batch_tokens="auto").max_batch_tokens == "auto"
    assert ExecutionSpec(max_batch_tokens=4096).max_batch_tokens == 4096
    for bad in (0, "big"):
        with pytest.raises(ValueError, match="max_batch_tokens"):
            ExecutionSpec(max_batch_tokens=bad)


def test_answerer_resolves_auto_after_loading(tmp_path):
    import pyarrow as pa

    from pipeline.spec import parse_spec
    from pipeline.stages.answer import Answerer
    from resprune.tiny import build_tiny_checkpoint

    model = build_tiny_checkpoint("llava", tmp_path / "m")
    doc = {
        "name": "t",
        "input": {"uri": "in/"},
        "output": {"uri": "out/"},
        "model": {"path": str(model)},
        "execution": {"gpus_per_actor": 0},
    }
    for setting, want in (("auto", DEFAULT_CPU_BATCH_TOKENS), (300, 300)):
        doc["execution"]["max_batch_tokens"] = setting
        spec = parse_spec(doc)
        answerer = Answerer(spec, run_id="r", run_date="2026-01-01", passthrough=pa.schema([]))
        assert answerer.batch_tokens == want
