"""The memory budget: KV and activation bytes per token by hand, and what it packs."""

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig

from pipeline.spec import ExecutionSpec
from pipeline.stages.answer import pack
from resprune.loading import load_preprocessor, load_vlm
from resprune.memory import (
    DEFAULT_CPU_BATCH_TOKENS,
    activation_bytes_per_token,
    batch_token_budget,
    kv_bytes_per_token,
    resolve_batch_tokens,
)
from resprune.tiny import build_tiny_checkpoint

TINY = LlamaConfig(
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
)
LLAVA_7B_TEXT = {  # llava-1.5-7b's language model (Vicuna-7B)
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "intermediate_size": 11008,
}
LLAVA_7B = LlamaConfig(**LLAVA_7B_TEXT)


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
    cpu = torch.device("cpu")
    assert resolve_batch_tokens(5000, cpu) == 5000
    assert resolve_batch_tokens(None, cpu) is None
    assert resolve_batch_tokens("auto", cpu) == DEFAULT_CPU_BATCH_TOKENS


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
        assert answerer.packer.batch_tokens == want


# ---- the whole batch: vision, selector, padded and bucketed KV (resprune.memory.BatchMemory)


def llava_15_7b_config():
    """llava-hf/llava-1.5-7b-hf's config, built offline (no weights)."""
    from transformers import CLIPVisionConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    text = LlamaConfig(**LLAVA_7B_TEXT, vocab_size=32064, max_position_embeddings=4096)
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=32000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def llava_item(text_tokens: int = 60):
    """A prepared LLaVA-1.5 item: 576 image tokens, ``text_tokens`` others, one 336 px image."""
    import numpy as np

    ids = np.concatenate([np.full(576, 32000), np.arange(text_tokens)])
    return SimpleNamespace(input_ids=ids, pixel_values=np.zeros((3, 336, 336), np.float32))


H200_FREE = 141_000_000_000 - 14_100_000_000 - 600_000_000  # 141 GB less bf16 weights, context


def test_worked_example_h200_llava_7b_keep_64_fits():
    """The LLM-only rule packed ~1,050 keep-64 items per batch on an H200; at their padded,
    bucketed length with the vision tower's activations they cannot fit. The whole-batch
    estimate packs fewer, and its peak fits the budget."""
    from resprune.memory import BatchMemory, BatchShape

    config = llava_15_7b_config()
    cost = 60 + 64 + 32  # text + kept + new tokens
    old = len(
        pack(
            [cost] * 4000,
            budget=batch_token_budget(H200_FREE, config.text_config, torch.bfloat16),
            max_items=4096,
        )[0]
    )
    assert 1000 <= old <= 1100  # "about 1,050 items allowed"
    memory = BatchMemory(config, torch.bfloat16, max_new_tokens=32)
    budget = int(H200_FREE * (1 - 0.15))
    item = memory.item(llava_item(), cost=cost, keep=64)
    shape = BatchShape()
    for _ in range(old):
        shape = memory.add(shape, item)
    parts = memory.parts(shape)
    assert 100e9 < parts["kv"] < 110e9  # 1,080 rows x 192 tokens x 0.5 MiB
    assert parts["vision"] > 60e9  # CLIP's 25 kept hidden states alone are ~31 GB
    assert memory.bytes(shape) > 1.5 * budget  # what today's rule packs cannot fit
    n = memory.largest_batch(budget, item)
    assert 300 < n < old
    one_more = memory.largest_batch(budget + 10**9, item)
    assert one_more >= n
    batches = pack([cost] * 2000, budget=None, max_items=4096, grow=_grow(memory, budget, item))
    assert len(batches[0]) == n
    for batch in batches:
        shape = BatchShape()
        for _ in batch:
            shape = memory.add(shape, item)
        assert memory.bytes(shape) <= budget


def _grow(memory, budget, item):
    from resprune.memory import BatchShape

    def grow(state, i):
        shape = memory.add(state or BatchShape(), item)
        return shape, memory.bytes(shape) <= budget

    return grow


def test_padding_and_buckets_count_against_the_budget():
    """One long item among short ones: every row holds the longest, rounded up."""
    from resprune.memory import BatchMemory

    memory = BatchMemory(llava_15_7b_config(), torch.bfloat16, max_new_tokens=32)
    short, long = (memory.item(llava_item(t), cost=t + 96, keep=64) for t in (60, 900))
    from resprune.memory import BatchShape

    shape = BatchShape()
    for foot in [long] + [short] * 8:
        shape = memory.add(shape, foot)
    per_token = kv_bytes_per_token(LLAVA_7B, torch.bfloat16)
    assert memory.parts(shape)["kv"] == 16 * 1024 * per_token  # 9 rows -> 16, 996 -> 1024
    dynamic = BatchMemory(
        llava_15_7b_config(), torch.bfloat16, max_new_tokens=32, static_cache=False
    )
    parts = dynamic.parts(shape)  # a dynamic cache: 9 rows x 996, while the prefill runs
    assert parts["kv"] == 0 and parts["prefill"] > 9 * 996 * per_token


def test_selector_and_vision_scale_with_the_images():
    from resprune.memory import BatchMemory, BatchShape

    memory = BatchMemory(llava_15_7b_config(), torch.bfloat16, max_new_tokens=32)
    pruned = memory.item(llava_item(), cost=156, keep=64)
    unpruned = memory.item(llava_item(), cost=668, keep=None)  # the shadow pass: no Gram
    assert pruned.tower == unpruned.tower > 25 * 577 * 1024 * 2  # CLIP's hidden states
    assert unpruned.sets == 0
    one = memory.parts(memory.add(BatchShape(), pruned))
    assert one["selection"] >= 2 * pruned.features + 4 * 2 * 576 * 576  # Gram, weights
    assert one["graphs"] >= 4 * 576 * 576  # the captured bucket's static input
    none = memory.parts(memory.add(BatchShape(), unpruned))
    assert none["graphs"] < 4 * 576 * 576  # the decode graph's pool only: no selector input
    assert none["selection"] == 2 * unpruned.features


def test_device_budget_takes_the_actors_share(monkeypatch):
    from resprune import memory

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (60 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 15 * 2**30)
    whole = memory.device_budget(torch.device("cuda"), 1.0)
    half = memory.device_budget(torch.device("cuda"), 0.5)
    assert whole == int(60 * 2**30 * 0.85)  # what is free
    assert half == int((40 - 15) * 2**30 * 0.85)  # half the GPU, less its own weights


# ---- an out-of-memory shrinks the actor's budget (pipeline.stages.answer.Answerer)


class Clock:
    """A fake ``time.perf_counter``: advanced by the simulated device only."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TightDevice:
    """The transformers engine on a simulated device with room for ``limit`` LLM tokens per
    batch: beyond it, generate raises CUDA's out-of-memory error. The clock advances by
    ``PER_TOKEN`` per token of a batch that runs and by ``WASTED`` for one that fails."""

    name = "tight"
    PER_TOKEN, WASTED = 1e-3, 0.25

    def __init__(self, vlm, limit: int, clock: Clock):
        from resprune.engines.hf import TransformersEngine

        self.inner, self.limit, self.clock = TransformersEngine(vlm), limit, clock
        self.attempts: list[tuple[int, int, bool]] = []  # (items, tokens, fitted)

    def generate(self, plans, max_new_tokens):
        tokens = sum(len(p.ids) + max_new_tokens for p in plans)
        fits = tokens <= self.limit
        self.attempts.append((len(plans), tokens, fits))
        if not fits:
            self.clock.now += self.WASTED
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.clock.now += tokens * self.PER_TOKEN
        return self.inner.generate(plans, max_new_tokens)


@pytest.mark.parametrize("budget", ["tokens", "device_bytes"])
def test_out_of_memory_shrinks_the_budget_and_answers_everything(budget, tiny_llava, monkeypatch):
    import time

    import pyarrow as pa

    from pipeline.spec import parse_spec
    from pipeline.stages.answer import SHRINK, Answerer
    from resprune.items import ItemResult
    from resprune.loading import load_preprocessor
    from resprune.memory import BatchMemory
    from tests.vlm_helpers import QUESTIONS, images

    doc = {
        "name": "t",
        "input": {"uri": "in/"},
        "output": {"uri": "out/"},
        "model": {"path": str(tiny_llava), "max_new_tokens": 2},
        "pruning": {"keep": 16},
        "execution": {"gpus_per_actor": 0, "batch_size": 64},
    }
    answerer = Answerer(
        parse_spec(doc), run_id="r", run_date="2026-01-01", passthrough=pa.schema([])
    )
    if budget == "device_bytes":  # `auto` on a GPU: packed by device bytes, all in one batch
        answerer.packer.memory = BatchMemory(
            answerer.vlm.model.config, torch.float32, max_new_tokens=2
        )
        answerer.packer.budget_bytes = 10**12
    pre = load_preprocessor(str(tiny_llava))
    pictures = images()
    items = [pre.prepare(pictures[i % 3], QUESTIONS[i % 3]) for i in range(20)]
    clock = Clock()
    monkeypatch.setattr(time, "perf_counter", clock)
    cost = answerer.packer.cost(items[0], answerer.pruner, 16)
    device = answerer.engine = TightDevice(answerer.vlm, limit=5 * cost, clock=clock)

    first = answerer._answer(items[:12], answerer.pruner, 16)
    assert all(isinstance(a.result, ItemResult) for a in first)  # everything answered
    fitted = [a for a in device.attempts if a[2]]
    failed = [a for a in device.attempts if not a[2]]
    assert failed and sum(n for n, _, _ in fitted) == 12  # each item answered once
    if budget == "tokens":  # converged to a budget the device holds (device_bytes: the
        assert answerer.packer.oom_tokens <= 5 * cost  # byte budget may shrink enough first)
    # gpu_seconds: each item's share of the batch that answered it; failed attempts are
    # billed as overhead (failed_gpu_seconds), never as model time
    assert sum(a.seconds for a in first) == pytest.approx(
        sum(t for _, t, _ in fitted) * TightDevice.PER_TOKEN
    )
    assert sum(a.failed_s for a in first) == pytest.approx(len(failed) * TightDevice.WASTED)
    assert sum(a.seconds + a.failed_s for a in first) == pytest.approx(clock.now)
    by_batch: dict[str, list[float]] = {}
    for a in first:
        by_batch.setdefault(a.batch_id, []).append(a.seconds)
    assert sorted(round(sum(s), 9) for s in by_batch.values()) == sorted(
        round(t * TightDevice.PER_TOKEN, 9) for _, t, _ in fitted
    )  # one share per item of the batch that answered it, never doubled by the retries
    assert all(max(s) == min(s) for s in by_batch.values())
    if budget == "device_bytes":
        assert answerer.packer.budget_bytes < 10**12 * SHRINK

    before = len(device.attempts)  # remembered: the actor's next batches fit at once
    later = answerer._answer(items[12:], answerer.pruner, 16)
    assert all(isinstance(a.result, ItemResult) for a in later)
    assert all(fits for _, _, fits in device.attempts[before:])
    assert max(n for n, _, _ in device.attempts[before:]) >= 2  # still batched


def test_out_of_memory_with_one_item_stays_systemic(tiny_llava, monkeypatch):
    import pyarrow as pa

    from pipeline import faults
    from pipeline.spec import parse_spec
    from pipeline.stages.answer import Answerer
    from resprune.loading import load_preprocessor
    from tests.vlm_helpers import prepared

    doc = {
        "name": "t",
        "input": {"uri": "in/"},
        "output": {"uri": "out/"},
        "model": {"path": str(tiny_llava), "max_new_tokens": 2},
        "execution": {"gpus_per_actor": 0},
    }
    answerer = Answerer(
        parse_spec(doc), run_id="r", run_date="2026-01-01", passthrough=pa.schema([])
    )
    answerer.engine = TightDevice(answerer.vlm, limit=1, clock=Clock())
    items = prepared(load_preprocessor(str(tiny_llava)), 2)
    with pytest.raises(faults.SystemicFault, match="out of memory"):
        answerer._answer(items, answerer.pruner, 64)
    assert [n for n, _, _ in answerer.engine.attempts] == [2, 1]  # halved, then alone


# ---- the estimate against a measured peak (a real answer_batch at small geometry)

GPU = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
MARGIN = 2.0  # the estimate is at least the measured peak and at most MARGIN times it


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
@pytest.mark.parametrize(
    ("family", "n", "keep"),
    [("llava", 4, 16), ("llava", 4, None), ("llava_next", 3, 16), ("qwen2_5_vl", 4, 16)],
    ids=["llava-pruned", "llava-unpruned", "llava_next", "qwen2_5_vl"],
)
def test_estimate_holds_the_measured_peak(family, n, keep, device, tmp_path_factory):
    """`BatchMemory` against the peak of one `answer_batch` on a fresh static-cache engine
    (its KV pool allocated in the batch): live tensor bytes on the CPU (`tests.live_bytes`:
    every storage allocated inside, once, until freed), ``max_memory_allocated`` above what
    was allocated before on CUDA. The CPU has no CUDA graphs, so they are left out there."""
    from resprune.answer import answer_batch
    from resprune.engines.hf import TransformersEngine
    from resprune.memory import BatchMemory, BatchShape
    from resprune.pruners import build_pruner
    from tests.live_bytes import LiveBytes
    from tests.vlm_helpers import QUESTIONS, images

    path = build_tiny_checkpoint(family, tmp_path_factory.mktemp(family))
    vlm, pre = load_vlm(str(path), device=device), load_preprocessor(str(path))
    pictures = images()
    items = [pre.prepare(pictures[i % 3], QUESTIONS[i % 3]) for i in range(n)]
    pruner, new = build_pruner("resprune" if keep else "none"), 8
    kwargs = {"pruner": pruner, "keep": keep or 1.0, "max_new_tokens": new}
    answer_batch(vlm, items[:1], engine=TransformersEngine(vlm, cache="dynamic"), **kwargs)
    engine = TransformersEngine(vlm, cache="static", bucket=True)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = answer_batch(vlm, items, engine=engine, **kwargs)
        measured = torch.cuda.max_memory_allocated() - base
    else:
        with LiveBytes() as live:
            out = answer_batch(vlm, items, engine=engine, **kwargs)
        measured = live.peak
    memory = BatchMemory(
        vlm.model.config, vlm.model.dtype, max_new_tokens=new, cuda_graphs=device == "cuda"
    )
    shape = BatchShape()
    for item, result in zip(items, out, strict=True):
        shape = memory.add(shape, memory.item(item, cost=result.prompt_tokens + new, keep=keep))
    estimate = memory.bytes(shape)
    assert measured <= estimate <= MARGIN * measured, (measured, estimate, memory.parts(shape))


def test_persistent_buffers_are_charged_at_the_largest_batch_run():
    """The KV pool and the graphs' buffers never shrink: once a large batch ran, a small
    one is charged the large one's (the packer tells the model every batch it packs)."""
    from resprune.memory import BatchMemory, BatchShape

    memory = BatchMemory(llava_15_7b_config(), torch.bfloat16, max_new_tokens=32)
    item = memory.item(llava_item(), cost=156, keep=64)
    big, small = BatchShape(), memory.add(BatchShape(), item)
    for _ in range(32):
        big = memory.add(big, item)
    alone = memory.bytes(small)
    memory.ran(big)
    assert memory.parts(small)["kv"] == memory.parts(big)["kv"] > 0
    assert memory.parts(small)["graphs"] == memory.parts(big)["graphs"]
    assert memory.bytes(small) > alone
