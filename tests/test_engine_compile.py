"""The compiled decode: one graph per bucket whatever the attention, and its compile time
never counted as model time.

CPU stand-ins for the GPU: dynamo with the eager backend traces and guards on the CPU as it
does on CUDA (only the code generation differs), so graph counts and compile seconds are
real here. flash_attention_2 needs CUDA, so its contract is emulated: an attention function
and a mask function registered under a name with "flash" in it (transformers then treats it
as FlashAttention: the 2-D padding mask ``[B, L + t]`` is kept under a static cache, sliced
by its own `flash_attention_mask`, one column longer each decode step).
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from torch._dynamo.utils import counters
from transformers import AttentionInterface, CompileConfig
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from resprune import overhead
from resprune.answer import answer_batch
from resprune.engines.hf import TransformersEngine
from tests.vlm_helpers import prepared, tiny_vlm

FLASH = "flash_attention_2_cpu"  # FA2's mask contract on the CPU (see the module docstring)
EAGER_BACKEND = CompileConfig(backend="eager", mode=None, dynamic=False)
NEW = 5


def flash_like(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """FA2's contract: keys beyond the 2-D mask's length are dropped (`_upad_input` slices a
    static cache the same way), padding masked, causal from the end; None: causal over all."""
    if attention_mask is not None:
        n = attention_mask.shape[-1]
        key, value = key[:, :, :n], value[:, :, :n]
    q, n = query.shape[2], key.shape[2]
    mask = torch.ones(q, n, dtype=torch.bool, device=query.device).tril(n - q)[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :].bool()
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(FLASH, flash_like)
AttentionMaskInterface.register(FLASH, flash_attention_mask)


def use_attention(vlm, name: str) -> None:
    """The language model (and the top-level config ``generate`` reads) on ``name``; the
    vision tower keeps sdpa, as it would keep FA2."""
    vlm.model.set_attn_implementation({"text_config": name})
    vlm.model.config._attn_implementation_internal = name  # a CPU name fails FA's own check


def ids(results) -> list[list[int]]:
    return [r.answer_ids for r in results]


@pytest.mark.parametrize("attention", ["sdpa", "eager", FLASH])
def test_one_compiled_graph_per_bucket_for_every_attention(attention, tmp_path_factory):
    """Two buckets (3 items -> 4 rows, 1 item), each answered twice: two graphs in all.

    Before the fix, the FA2 contract compiled one graph per decode step (NEW - 1 for the
    first bucket alone)."""
    vlm, pre = tiny_vlm("llava", tmp_path_factory)
    use_attention(vlm, attention)
    items = prepared(pre)
    engine = TransformersEngine(vlm, cache="static", compile=True, compile_config=EAGER_BACKEND)
    torch._dynamo.reset()
    counters.clear()
    seen = []
    for _ in range(2):
        for batch in (items, items[:1]):
            out = answer_batch(vlm, batch, pruner=None, keep=1.0, max_new_tokens=NEW, engine=engine)
            seen.append(ids(out))
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert not counters["graph_break"]
    assert [key[0] for key in engine.pool.caches] == [4, 1]  # two buckets
    dynamic = TransformersEngine(vlm, cache="dynamic")
    want = ids(answer_batch(vlm, items, pruner=None, keep=1.0, max_new_tokens=NEW, engine=dynamic))
    assert seen == [want, want[:1]] * 2
    now = "sdpa" if attention == FLASH else attention  # the language model's decode
    assert engine.attention == {"before": attention, "now": now}
    assert vlm.model.config.vision_config._attn_implementation == "sdpa"  # the tower keeps its own
    assert len(engine.warmups) == 2  # each bucket warmed up once, before its first batch


@pytest.fixture
def compiling_actor(tiny_llava: Path):
    """A CPU model actor whose engine compiles its decode (eager backend), every batch in the
    shadow sample; and three prepared rows."""
    from pipeline.spec import parse_spec
    from pipeline.stages.answer import Answerer
    from pipeline.stages.preprocess import Preprocess

    spec = parse_spec(
        {
            "name": "t",
            "input": {"uri": "in/"},
            "output": {"uri": "out/"},
            "model": {"path": str(tiny_llava), "max_new_tokens": NEW},
            "pruning": {"keep": 16},
            "execution": {"gpus_per_actor": 0, "batch_size": 4},
            "cost": {"shadow_fraction": 1.0},
        }
    )
    images = sorted(Path("pipeline/assets/images").glob("*.jpg"))[:3]
    rows = [{"id": p.stem, "image": p.read_bytes(), "question": "What is it?"} for p in images]
    batch = Preprocess(spec, [])(pa.Table.from_pylist(rows))
    actor = Answerer(spec, run_id="r", run_date="2026-01-01", passthrough=pa.schema([]))
    actor.engine = TransformersEngine(
        actor.vlm, cache="static", compile=True, compile_config=EAGER_BACKEND
    )
    torch._dynamo.reset()
    return actor, batch


def test_compile_time_is_billed_overhead_not_item_time(compiling_actor):
    """The first batch of each shape (pruned and its unpruned shadow twin) pays a compile;
    it lands in the actor's compile seconds and the run summary, not in any item."""
    from pipeline.job.ledger import Ledger
    from pipeline.output import summary

    actor, batch = compiling_actor
    before, labels = overhead.seconds(), overhead.by_label()
    first = actor(batch).to_pylist()
    second = actor(batch).to_pylist()  # the unpruned shape grew the KV pool in the first
    compiled = actor.clock.compile_s  # call: the pruned shape is re-warmed in the second
    later = [actor(batch).to_pylist() for _ in range(2)]
    every = first + second + later[0] + later[1]
    assert [r["status"] for r in every] == ["ok"] * 12 and all(r["shadow"] for r in every)
    # two shapes (pruned, unpruned shadow) warmed up, the library setup, nothing else
    assert len(actor.engine.warmups) == 2
    spent = {k: v - labels.get(k, 0.0) for k, v in overhead.by_label().items()}
    assert compiled == pytest.approx(sum(spent.values()))
    assert compiled == pytest.approx(overhead.seconds() - before) and compiled > 0
    assert actor.clock.compile_s == compiled  # the later calls compiled nothing
    # items carry model time only: it adds up to the busy time, with the compile beside it
    item_s = sum(r["gpu_seconds"] + r["shadow_gpu_seconds"] for r in every)
    assert actor.clock.busy_s == pytest.approx(item_s)
    assert all(r["generate_s"] <= r["gpu_seconds"] + 1e-9 for r in every)

    def batch_s(rows, key):
        return sum(r[key] for r in rows)  # a batch's items share its time: their sum is it

    for key in ("gpu_seconds", "shadow_gpu_seconds"):  # first ~ later batches (tolerant:
        slowest = max(batch_s(rows, key) for rows in later)  # shared CPUs are noisy)
        assert batch_s(first, key) <= 3 * slowest + 1.0, key
    # the run summary shows it as its own line, from what the actor tells the ledger
    ledger = Ledger.__ray_metadata__.modified_class()
    ledger.actor_started("a", time.time() - 60, {})
    ledger.actor_busy("a", actor.clock.busy_s, actor.clock.compile_s)
    doc = summary.Recorder._actors(None, ledger.snapshot(), time.time())
    assert doc["compile_seconds"] == pytest.approx(compiled)
    assert doc["model_seconds"] == pytest.approx(item_s)


def test_eval_warms_up_every_configuration(monkeypatch):
    """`pipeline eval` answers its first batch once under every configuration, discarded."""
    from pipeline.eval import run

    calls: list[tuple[str, int]] = []

    class Fake:
        def __init__(self, job, **kwargs):
            self.label = str(job.pruning.keep)

        def __call__(self, batch):
            calls.append((self.label, batch.num_rows))
            return batch

    monkeypatch.setattr(run, "Answerer", Fake)
    spec = type("Spec", (), {"model_copy": lambda self, update: type("J", (), update)()})()
    configs = [(f"c{k}", type("P", (), {"keep": k})()) for k in (8, 16, 32)]
    actor = run.EvalAnswerer(spec, configs, run_id="r", run_date="d", passthrough=pa.schema([]))
    table = pa.table({"id": ["a", "b"]})
    out = actor(table)
    assert calls == [("8", 2), ("16", 2), ("32", 2)] * 2  # warm-up pass, then the kept pass
    assert out.num_rows == 6
    calls.clear()
    actor(table)
    assert calls == [("8", 2), ("16", 2), ("32", 2)]  # later batches: no warm-up


def default_config_on_the_cpu(engine: TransformersEngine) -> None:
    """The engine's own default compile config (its dynamic dimensions), with dynamo's eager
    backend instead of inductor and CUDA graphs: graph counts and guards are the same."""
    engine.compile_config.backend, engine.compile_config.mode = "eager", None


def test_decode_compiles_are_bounded_whatever_the_prompt_lengths(tmp_path_factory):
    """Seven batches of different sizes and prompt lengths, unbucketed (every prompt length
    its own cache length: the worst case): each new shape is warmed up once, but dynamo
    compiles at most COMPILES_PER_PROCESS graphs (each an inductor compile on CUDA). Before
    the fix (static shapes) it compiled one graph per shape."""
    from resprune.engines.hf import COMPILES_PER_PROCESS
    from resprune.pruners import build_pruner
    from tests.vlm_helpers import QUESTIONS, images

    vlm, pre = tiny_vlm("llava", tmp_path_factory)
    pictures = images()
    items = [pre.prepare(pictures[i % 3], QUESTIONS[i % 3] + " Why?" * i) for i in range(12)]
    engine = TransformersEngine(vlm, cache="static", compile=True)
    default_config_on_the_cpu(engine)
    engine.bucket = False
    torch._dynamo.reset()
    counters.clear()
    labels = set(overhead.by_label())
    kwargs = {"pruner": build_pruner("resprune"), "max_new_tokens": NEW, "engine": engine}
    for n, keep in [(1, 8), (3, 8), (2, 20), (5, 12), (7, 30), (4, 5), (12, 40)]:
        out = answer_batch(vlm, items[:n], keep=keep, **kwargs)
    warmed = [k for k in overhead.by_label() if k.startswith("decode ") and k not in labels]
    assert len(warmed) == 7  # seven shapes, each warmed up
    assert counters["stats"]["unique_graphs"] <= COMPILES_PER_PROCESS, dict(counters["stats"])
    dynamic = TransformersEngine(vlm, cache="dynamic")
    assert ids(out) == ids(answer_batch(vlm, items, keep=40, **kwargs | {"engine": dynamic}))


def test_warm_up_runs_synthetic_input_of_the_batch_shape(tmp_path_factory, monkeypatch):
    """The warm-up generates on the batch's shape (rows, padded prompt, cache length) from its
    longest plan with zeroed features in every row, never on the batch's own content."""
    vlm, pre = tiny_vlm("llava", tmp_path_factory)
    engine = TransformersEngine(vlm, cache="static", compile=True, compile_config=EAGER_BACKEND)
    calls = []
    real = engine._generate

    def recording(rows, ids_, mask, positions, max_new_tokens, length, **extra):
        calls.append((list(rows), ids_.shape, length, overhead._depth > 0))
        return real(rows, ids_, mask, positions, max_new_tokens, length, **extra)

    monkeypatch.setattr(engine, "_generate", recording)
    items = prepared(pre)
    answer_batch(vlm, items, pruner=None, keep=1.0, max_new_tokens=NEW, engine=engine)
    (warm, warm_shape, warm_length, counted), (batch, shape, length, timed) = calls
    assert counted and not timed  # the warm-up inside an overhead window, the batch outside
    assert len(warm) == len(batch) == 4 and warm_length == length
    longest = max(batch, key=lambda p: len(p.ids))
    assert warm_shape == shape == (4, len(longest.ids))
    for plan in warm:
        assert torch.equal(plan.ids, longest.ids) and not plan.features.any()
    assert any(p.features.any() for p in batch)


def test_a_kv_pool_growth_forgets_the_warm_ups_it_invalidates(tmp_path_factory):
    """Growing the pool moves every cache tensor a captured decode used: the warm-ups seen
    before are forgotten, so a shape seen again is re-warmed (counted) before its batch."""
    vlm, pre = tiny_vlm("llava", tmp_path_factory)
    engine = TransformersEngine(vlm, cache="static", compile=True, compile_config=EAGER_BACKEND)
    items = prepared(pre)

    def answer(batch):
        answer_batch(vlm, batch, pruner=None, keep=1.0, max_new_tokens=NEW, engine=engine)

    answer(items[:1])
    (small,) = engine.warmups
    label = f"decode {small[0]}x{small[1]}"
    first = overhead.by_label()[label]
    answer(items)  # 4 rows: the pool grows
    assert engine.pool.grows == 2 and list(engine.warmups) != [small]
    assert small not in engine.warmups
    answer(items[:1])  # fits the grown pool, but its capture read the freed tensors
    assert small in engine.warmups and overhead.by_label()[label] > first
    answer(items[:1])
    assert overhead.by_label()[label] == pytest.approx(first + engine.warmups[small])
