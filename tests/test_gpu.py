"""The GPU tier: what only a CUDA device can check, and the same logic on the CPU.

Every test is parametrized over the device: the ``cuda`` cases are marked `gpu` (one command
on a machine with a GPU and a CUDA build of torch, this project installed with its dev extra:
``python -m pytest -m gpu``; `make test-gpu` runs the same with the interpreter in $PY), the
``cpu`` cases run in `make test`, so the tier's own logic (sizes, counters, budgets) cannot
break unseen before its first GPU run. On the CPU the compiled decode uses dynamo's eager
backend (graph counts and guards as on CUDA), and peaks are live tensor bytes
(`tests.live_bytes`) instead of ``torch.cuda.max_memory_allocated``. The tier:
- static (compiled decode, CUDA graphs, buckets) == dynamic ids, all three families (on the
  CPU: LLaVA; tests/test_engine_static.py covers the others there);
- one compiled graph per bucket across calls, for every attention offered (sdpa, eager,
  and flash_attention_2 where flash_attn is installed);
- the ``max_batch_tokens: auto`` budget: a batch packed to it peaks within the free memory it
  was computed from (on the CPU: the byte budget simulated, the tiny model);
- selector == scipy on CUDA: tests/test_select.py::test_cuda_picks_equal_cpu_and_scipy;
- the memory model against the measured peak: tests/test_memory.py (cpu and cuda cases).
"""

from __future__ import annotations

import importlib.util

import pyarrow as pa
import pytest
import torch
from torch._dynamo.utils import counters

from resprune.answer import answer_batch
from resprune.engines.hf import COMPILES_PER_PROCESS, TransformersEngine
from resprune.loading import load_preprocessor, load_vlm
from resprune.pruners import build_pruner
from resprune.tiny import build_tiny_checkpoint
from tests.test_engines import Recording
from tests.vlm_helpers import images, prepared

GPU = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = pytest.param("cuda", marks=GPU)
DEVICES = ["cpu", CUDA]
FLASH = pytest.mark.skipif(
    importlib.util.find_spec("flash_attn") is None, reason="flash_attn is not installed"
)
NEW = 6


def device_vlm(
    family: str, tmp_path_factory, device: str, *, dtype="float32", attn="sdpa", **sizes
):
    path = build_tiny_checkpoint(family, tmp_path_factory.mktemp(family), **sizes)
    vlm = load_vlm(str(path), device=device, dtype=dtype, attn_implementation=attn)
    return vlm, load_preprocessor(str(path)), path


def default_engine(vlm) -> TransformersEngine:
    """The CUDA default (static cache, compiled decode, buckets); on the CPU the same path
    with dynamo's eager backend in place of inductor and CUDA graphs."""
    if vlm.device.type == "cuda":
        return TransformersEngine(vlm)
    engine = TransformersEngine(vlm, cache="static", compile=True)
    engine.compile_config.backend, engine.compile_config.mode = "eager", None
    return engine


@pytest.mark.parametrize(
    ("family", "device"),
    [
        pytest.param("llava", "cpu", marks=pytest.mark.slow),  # ~20 s; test_engine_static too
        pytest.param("llava", "cuda", marks=GPU),
        pytest.param("llava_next", "cuda", marks=GPU),
        pytest.param("qwen2_5_vl", "cuda", marks=GPU),
    ],
)
def test_static_compiled_equals_dynamic_ids(family, device, tmp_path_factory):
    """The same kept sequences (mixed lengths, 3 rows -> bucket 4, then 1 row) through the
    CUDA default (static cache, compiled decode, CUDA graphs) and the dynamic cache."""
    vlm, pre, _ = device_vlm(family, tmp_path_factory, device)
    items = prepared(pre)
    rec = Recording(vlm)
    for keep, subset in ((8, items), (24, items[1:2]), (0.3, items[:1])):
        answer_batch(
            vlm, subset, pruner=build_pruner("resprune"), keep=keep, max_new_tokens=1, engine=rec
        )
    plans = [p for call in rec.plans for p in call]
    static = default_engine(vlm)  # auto on CUDA: static, compiled, bucketed
    assert (static.static, static.compile, static.bucket) == (True, True, True)
    dynamic = TransformersEngine(vlm, cache="dynamic")
    for batch in (plans[:3], plans[3:4], plans[:3]):  # the repeat replays the captured graphs
        want = [g.token_ids for g in dynamic.generate(batch, NEW)]
        assert [g.token_ids for g in static.generate(batch, NEW)] == want


@pytest.mark.parametrize(
    ("attn", "device"),
    [
        ("sdpa", "cpu"),
        pytest.param("sdpa", "cuda", marks=GPU),
        pytest.param("eager", "cuda", marks=GPU),
        pytest.param("flash_attention_2", "cuda", marks=[*GPU, FLASH]),
    ],
)
def test_one_compiled_graph_per_bucket(attn, device, tmp_path_factory):
    """The engine's default (inductor + CUDA graphs on CUDA, dynamic dimensions): two
    buckets, each answered twice: two graphs (batch 1 is its own, dynamo specialises it)."""
    dtype = "bfloat16" if attn == "flash_attention_2" else "float32"
    vlm, pre, _ = device_vlm("llava", tmp_path_factory, device, dtype=dtype, attn=attn)
    items = prepared(pre)
    engine = default_engine(vlm)
    assert engine.attention["now"] in ("sdpa", "eager")  # FA2's growing mask never compiled
    if attn == "flash_attention_2":
        assert vlm.model.config.vision_config._attn_implementation == "flash_attention_2"
    torch._dynamo.reset()
    counters.clear()
    for _ in range(2):
        for batch in (items, items[:1]):
            answer_batch(vlm, batch, pruner=None, keep=1.0, max_new_tokens=NEW, engine=engine)
    assert len(engine.pool.caches) == 2
    assert counters["stats"]["unique_graphs"] <= COMPILES_PER_PROCESS, dict(counters["stats"])
    assert len(engine.warmups) == 2 and all(s > 0 for s in engine.warmups.values())


def first_batch_size(actor, distinct, pruner, keep) -> int:
    """Items in the first batch the actor's packer makes of a long run of ``distinct``
    (under ``auto`` on CUDA the budget is device bytes, ``packer.batch_tokens`` is None)."""
    pool = [distinct[i % len(distinct)] for i in range(actor.spec.execution.batch_size)]
    return len(actor.packer.batches(pool, pruner, keep)[0])


FREE = 1 << 30  # the free memory the budget is computed from (1 GiB)
BIG_TEXT = {  # per token: 32 KiB of bf16 KV + 36 KiB of activations -> ~13k tokens per GiB
    "text_hidden": 1024,
    "text_layers": 8,
    "text_intermediate": 4096,
    "heads": 16,
    "kv_heads": 16,
}


FREE_CPU = 64 << 20  # on the CPU: the tiny model, a 64 MiB budget simulated


def simulate_auto_on_a_gpu(actor, free: int) -> None:
    """On the CPU, the actor as ``auto`` sets it up on a GPU: the static, bucketed cache and
    batches packed by device bytes under ``free`` (less the reserve); no CUDA graphs."""
    from resprune.memory import RESERVE_SHARE, BatchMemory

    actor.engine = TransformersEngine(actor.vlm, cache="static", bucket=True)
    vlm = actor.vlm
    packer = actor.packer
    packer.batch_tokens = None
    packer.memory = BatchMemory(
        vlm.model.config, vlm.model.dtype, max_new_tokens=16, cuda_graphs=False
    )
    packer.budget_bytes = int(free * (1 - RESERVE_SHARE))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pruned", [False, True], ids=["unpruned", "pruned"])
def test_auto_batch_budget_peak_fits_the_free_memory(pruned, device, tmp_path_factory, monkeypatch):
    """An actor with ``max_batch_tokens: auto`` told it has ``free`` bytes packs one batch up
    to its budget; the batch's peak allocation above the weights stays within them."""
    from pipeline.spec import parse_spec
    from pipeline.stages.answer import Answerer
    from tests.live_bytes import LiveBytes

    cuda = device == "cuda"
    free, sizes = (FREE, BIG_TEXT) if cuda else (FREE_CPU, {})
    path = build_tiny_checkpoint("llava", tmp_path_factory.mktemp("big"), **sizes)
    spec = parse_spec(
        {
            "name": "t",
            "input": {"uri": "in/"},
            "output": {"uri": "out/"},
            "model": {"path": str(path), "max_new_tokens": 16},
            "pruning": {"keep": 16},
            "execution": {
                "max_batch_tokens": "auto",
                "batch_size": 4096,
                "gpus_per_actor": 1 if cuda else 0,
            },
        }
    )
    if cuda:
        total = torch.cuda.mem_get_info()[1]
        with monkeypatch.context() as m:
            m.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))
            actor = Answerer(spec, run_id="r", run_date="2026-01-01", passthrough=pa.schema([]))
    else:
        actor = Answerer(spec, run_id="r", run_date="2026-01-01", passthrough=pa.schema([]))
        simulate_auto_on_a_gpu(actor, free)
    pre = load_preprocessor(str(path))
    distinct = [pre.prepare(im, "What is in the picture?") for im in images()]
    pruner, keep = (actor.pruner, 16) if pruned else (actor.unpruned, 1.0)
    n = first_batch_size(actor, distinct, pruner, keep)
    assert n >= 8, n  # a real batch, not a degenerate one
    items = [distinct[i % len(distinct)] for i in range(n)]
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = actor._answer(items, pruner, keep)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with LiveBytes() as live:
            out = actor._answer(items, pruner, keep)
        peak = live.peak
    assert {a.batch_size for a in out} == {n}  # one batch, at the budget
    assert all(type(a.result).__name__ == "ItemResult" for a in out)
    assert peak <= free, f"peak {peak / 2**20:.0f} MiB > {free / 2**20:.0f} MiB for {n} items"
