"""Benchmark (CPU): compiled decode graphs per bucket per attention, and the first batch's cost.

Two CPU proxies for what a GPU night pays (issue 18, items 1 and 2), with dynamo's eager
backend (it traces and guards as on CUDA; only code generation differs):

1. Graphs per bucket: per family and attention (sdpa, eager, and flash_attention_2's mask
   contract emulated on the CPU as in tests/test_engine_compile.py), a static-cache engine
   with a compiled decode answers two buckets (3 items -> 4 rows, then 1 item) twice each
   with ``--new-tokens``; dynamo's unique graphs over buckets. One is the target; FA2's
   growing 2-D mask used to give one graph per decode step.
2. First batch vs later ones: a model actor (`pipeline.stages.answer.Answerer`, every batch in
   the shadow sample) answers the same 3 items ``--calls`` times; per call, the items' summed
   GPU seconds (pruned pass and unpruned shadow twin) and the actor's compile seconds.

Prints one JSON line per part, flushed. Runs on older checkouts too (missing fields: null).

    .venv/bin/python bench/compile.py                  # 3 families, ~2-5 min on 2 quiet cores
    .venv/bin/python bench/compile.py --families llava
"""

# ruff: noqa: E402  (sys.path is fixed before the other imports)
from __future__ import annotations

import os
import sys

# Run as a script, bench/ is sys.path[0] and bench/select.py would shadow the stdlib `select`.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch
from torch._dynamo.utils import counters

from resprune.answer import answer_batch
from resprune.engines.hf import TransformersEngine
from resprune.loading import load_preprocessor, load_vlm
from resprune.tiny import build_tiny_checkpoint
from tests.test_engine_compile import EAGER_BACKEND, FLASH, use_attention
from tests.vlm_helpers import prepared

ROOT = Path(sys.path[0])


def graphs_per_bucket(family: str, new_tokens: int) -> dict:
    """{attention: graphs, buckets, graphs per bucket, graph breaks, seconds}."""
    path = build_tiny_checkpoint(family, Path(tempfile.mkdtemp()) / family)
    out = {}
    for attention in ("sdpa", "eager", FLASH):
        vlm, pre = load_vlm(str(path)), load_preprocessor(str(path))
        use_attention(vlm, attention)
        items = prepared(pre)
        engine = TransformersEngine(vlm, cache="static", compile=True, compile_config=EAGER_BACKEND)
        torch._dynamo.reset()
        counters.clear()
        t = time.perf_counter()
        for _ in range(2):
            for batch in (items, items[:1]):
                answer_batch(
                    vlm, batch, pruner=None, keep=1.0, max_new_tokens=new_tokens, engine=engine
                )
        graphs, buckets = counters["stats"]["unique_graphs"], len(engine.pool.caches)
        out[attention] = {
            "graphs": graphs,
            "buckets": buckets,
            "graphs_per_bucket": graphs / buckets,
            "graph_breaks": sum(counters["graph_break"].values()),
            "decode_attention": getattr(engine, "attention", None),
            "seconds": time.perf_counter() - t,
        }
        per = out[attention]["graphs_per_bucket"]
        print(f"{family:>11} {attention:<22} {per:.1f} graphs/bucket", flush=True)
    return out


def first_batch(calls: int, new_tokens: int) -> dict:
    """Per call of the same batch: pruned and shadow batch seconds, compile seconds so far."""
    from pipeline.spec import parse_spec
    from pipeline.stages.answer import Answerer
    from pipeline.stages.preprocess import Preprocess

    path = build_tiny_checkpoint("llava", Path(tempfile.mkdtemp()) / "llava")
    spec = parse_spec(
        {
            "name": "bench",
            "input": {"uri": "in/"},
            "output": {"uri": "out/"},
            "model": {"path": str(path), "max_new_tokens": new_tokens},
            "pruning": {"keep": 16},
            "execution": {"gpus_per_actor": 0, "batch_size": 4},
            "cost": {"shadow_fraction": 1.0},
        }
    )
    images = sorted((ROOT / "pipeline/assets/images").glob("*.jpg"))[:3]
    rows = [{"id": p.stem, "image": p.read_bytes(), "question": "What is it?"} for p in images]
    batch = Preprocess(spec, [])(pa.Table.from_pylist(rows))
    actor = Answerer(spec, run_id="r", run_date="2026-01-01", passthrough=pa.schema([]))
    actor.engine = TransformersEngine(
        actor.vlm, cache="static", compile=True, compile_config=EAGER_BACKEND
    )
    torch._dynamo.reset()
    per_call = []
    for n in range(calls):
        t = time.perf_counter()
        out = actor(batch).to_pylist()
        per_call.append(
            {
                "call": n + 1,
                "wall_s": time.perf_counter() - t,
                "pruned_batch_s": sum(r["gpu_seconds"] for r in out),
                "shadow_batch_s": sum(r["shadow_gpu_seconds"] or 0.0 for r in out),
                "compile_s_so_far": getattr(actor, "compile_s", None),
            }
        )
        print(json.dumps(per_call[-1]), flush=True)
    summary = {}
    for key in ("pruned_batch_s", "shadow_batch_s"):
        later = statistics.median(c[key] for c in per_call[1:])
        summary[f"{key}_first_over_later_median"] = per_call[0][key] / later
    return {"calls": per_call, **summary}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="*", default=["llava", "llava_next", "qwen2_5_vl"])
    p.add_argument("--new-tokens", type=int, default=6)
    p.add_argument("--calls", type=int, default=5, help="calls of the first-batch part")
    args = p.parse_args()
    graphs = {f: graphs_per_bucket(f, args.new_tokens) for f in args.families}
    print(json.dumps({"part": "graphs_per_bucket", "new_tokens": args.new_tokens, **graphs}))
    first = first_batch(args.calls, args.new_tokens)
    print(json.dumps({"part": "first_batch", **first}), flush=True)


if __name__ == "__main__":
    main()
