"""The GPU tier: what only a CUDA device can check. One command, on a machine with a GPU and
a CUDA build of torch (this project installed with its dev extra):

    python -m pytest -m gpu

(`make test-gpu` runs the same with the interpreter in $PY.) Skipped without CUDA; the CPU
suite never runs it (`-m 'not slow and not gpu'`), and `bench/gpu.py --smoke` checks none of
it. The tier, every test marked `gpu`:
- static (compiled decode, CUDA graphs, buckets) == dynamic ids on CUDA, all three families;
- one compiled graph per bucket across calls, for every attention offered (sdpa, eager,
  and flash_attention_2 where flash_attn is installed);
- the ``max_batch_tokens: auto`` budget: a batch packed to it peaks
  (``torch.cuda.max_memory_allocated``) within the free memory it was computed from;
- selector == scipy on CUDA: tests/test_select.py::test_cuda_picks_equal_cpu_and_scipy.
"""

from __future__ import annotations

import importlib.util

import pyarrow as pa
import pytest
import torch
from torch._dynamo.utils import counters

from resprune.answer import answer_batch
from resprune.engines.hf import TransformersEngine
from resprune.loading import load_preprocessor, load_vlm
from resprune.pruners import build_pruner
from resprune.tiny import build_tiny_checkpoint
from tests.test_engines import Recording
from tests.vlm_helpers import images, prepared

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
FLASH = pytest.mark.skipif(
    importlib.util.find_spec("flash_attn") is None, reason="flash_attn is not installed"
)
NEW = 6


def cuda_vlm(family: str, tmp_path_factory, *, dtype="float32", attn="sdpa", **sizes):
    path = build_tiny_checkpoint(family, tmp_path_factory.mktemp(family), **sizes)
    vlm = load_vlm(str(path), device="cuda", dtype=dtype, attn_implementation=attn)
    return vlm, load_preprocessor(str(path)), path


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_5_vl"])
def test_static_compiled_equals_dynamic_ids_on_cuda(family, tmp_path_factory):
    """The same kept sequences (mixed lengths, 3 rows -> bucket 4, then 1 row) through the
    CUDA default (static cache, compiled decode, CUDA graphs) and the dynamic cache."""
    vlm, pre, _ = cuda_vlm(family, tmp_path_factory)
    items = prepared(pre)
    rec = Recording(vlm)
    for keep, subset in ((8, items), (24, items[1:2]), (0.3, items[:1])):
        answer_batch(
            vlm, subset, pruner=build_pruner("resprune"), keep=keep, max_new_tokens=1, engine=rec
        )
    plans = [p for call in rec.plans for p in call]
    static = TransformersEngine(vlm)  # auto on CUDA: static, compiled, bucketed
    assert (static.static, static.compile, static.bucket) == (True, True, True)
    dynamic = TransformersEngine(vlm, cache="dynamic")
    for batch in (plans[:3], plans[3:4], plans[:3]):  # the repeat replays the captured graphs
        want = [g.token_ids for g in dynamic.generate(batch, NEW)]
        assert [g.token_ids for g in static.generate(batch, NEW)] == want


@pytest.mark.parametrize("attn", ["sdpa", "eager", pytest.param("flash_attention_2", marks=FLASH)])
def test_one_compiled_graph_per_bucket_on_cuda(attn, tmp_path_factory):
    """Inductor + CUDA graphs (the engine's default): two buckets, each answered twice."""
    dtype = "bfloat16" if attn == "flash_attention_2" else "float32"
    vlm, pre, _ = cuda_vlm("llava", tmp_path_factory, dtype=dtype, attn=attn)
    items = prepared(pre)
    engine = TransformersEngine(vlm)
    assert engine.attention["now"] in ("sdpa", "eager")  # FA2's growing mask never compiled
    if attn == "flash_attention_2":
        assert vlm.model.config.vision_config._attn_implementation == "flash_attention_2"
    torch._dynamo.reset()
    counters.clear()
    for _ in range(2):
        for batch in (items, items[:1]):
            answer_batch(vlm, batch, pruner=None, keep=1.0, max_new_tokens=NEW, engine=engine)
    assert len(engine.pool.caches) == 2
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
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


@pytest.mark.parametrize("pruned", [False, True], ids=["unpruned", "pruned"])
def test_auto_batch_budget_peak_fits_the_free_memory(pruned, tmp_path_factory, monkeypatch):
    """An actor with ``max_batch_tokens: auto`` told it has 1 GiB free packs one batch up to
    its budget; the batch's peak allocation above the weights stays within that 1 GiB."""
    from pipeline.spec import parse_spec
    from pipeline.stages.answer import Answerer

    path = build_tiny_checkpoint("llava", tmp_path_factory.mktemp("big"), **BIG_TEXT)
    spec = parse_spec(
        {
            "name": "t",
            "input": {"uri": "in/"},
            "output": {"uri": "out/"},
            "model": {"path": str(path), "max_new_tokens": 16},
            "pruning": {"keep": 16},
            "execution": {"max_batch_tokens": "auto", "batch_size": 4096, "gpus_per_actor": 1},
        }
    )
    total = torch.cuda.mem_get_info()[1]
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "mem_get_info", lambda device=None: (FREE, total))
        actor = Answerer(spec, run_id="r", run_date="2026-01-01", passthrough=pa.schema([]))
    pre = load_preprocessor(str(path))
    distinct = [pre.prepare(im, "What is in the picture?") for im in images()]
    pruner, keep = (actor.pruner, 16) if pruned else (actor.unpruned, 1.0)
    n = first_batch_size(actor, distinct, pruner, keep)
    assert n >= 8, n  # a real batch, not a degenerate one
    items = [distinct[i % len(distinct)] for i in range(n)]
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = actor._answer(items, pruner, keep)
    peak = torch.cuda.max_memory_allocated() - base
    assert {a.batch_size for a in out} == {n}  # one batch, at the budget
    assert all(type(a.result).__name__ == "ItemResult" for a in out)
    assert peak <= FREE, f"peak {peak / 2**20:.0f} MiB > {FREE / 2**20:.0f} MiB for {n} items"
