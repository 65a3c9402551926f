"""Decode compiles per process over many prompt lengths: dynamic dimensions (the engine's
default) against static shapes (one compile per shape), CPU proxy (issue 28).

dynamo with its eager backend traces and guards on the CPU as it does on CUDA (only the code
generation differs), so its graph count is the number of inductor compiles a GPU would pay.
Batches of 1 to 12 items at different budgets (so different prompt and cache lengths), with
the engine's buckets and without them (every length its own cache length: the worst case).
Prints one line per configuration and a JSON line. Run: python bench/compiles.py
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, bench/ is sys.path[0] and bench/select.py would shadow the stdlib `select`.
here = Path(__file__).parent.resolve()
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
sys.path.insert(0, str(here.parent))

import json  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from resprune import overhead  # noqa: E402
from resprune.answer import answer_batch  # noqa: E402
from resprune.engines.hf import COMPILES_PER_PROCESS, TransformersEngine  # noqa: E402
from resprune.loading import load_preprocessor, load_vlm  # noqa: E402
from resprune.pruners import build_pruner  # noqa: E402
from resprune.tiny import build_tiny_checkpoint  # noqa: E402
from tests.vlm_helpers import QUESTIONS, images  # noqa: E402

BATCHES = [(1, 8), (3, 8), (2, 20), (5, 12), (7, 30), (4, 5), (12, 40), (6, 16), (9, 24)]


def compiles(vlm, items, dynamic: bool, bucket: bool) -> dict:
    engine = TransformersEngine(vlm, cache="static", compile=True, bucket=bucket)
    engine.compile_config.backend, engine.compile_config.mode = "eager", None
    engine.compile_config.dynamic = dynamic
    torch._dynamo.reset()
    counters.clear()
    before = overhead.by_label()
    for n, keep in BATCHES:
        answer_batch(
            vlm,
            items[:n],
            pruner=build_pruner("resprune"),
            keep=keep,
            max_new_tokens=4,
            engine=engine,
        )
    shapes = [
        k
        for k, v in overhead.by_label().items()
        if k.startswith("decode ") and v > before.get(k, 0.0)
    ]
    return {"shapes": len(shapes), "compiles": counters["stats"]["unique_graphs"]}


def main() -> None:
    out = {}
    for family in ("llava", "qwen2_5_vl"):
        path = build_tiny_checkpoint(family, tempfile.mkdtemp())
        vlm, pre = load_vlm(str(path)), load_preprocessor(str(path))
        pictures = images()
        items = [pre.prepare(pictures[i % 3], QUESTIONS[i % 3] + " Why?" * i) for i in range(12)]
        for bucket in (True, False):
            for dynamic in (True, False):
                row = compiles(vlm, items, dynamic, bucket)
                key = f"{family} bucket={bucket} dynamic={dynamic}"
                out[key] = row
                print(f"{key:40s} {row}", flush=True)
    print(json.dumps({"bench": "compiles", "bound": COMPILES_PER_PROCESS, "results": out}))


if __name__ == "__main__":
    main()
