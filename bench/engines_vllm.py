"""Benchmark: the transformers engine vs the vLLM engine on the same pruned items, side by side.

Random weights, one model per family: LLaVA-1.5 geometry (336 px, patch 14: 576 visual
tokens) and Qwen2.5-VL geometry (672 px, patch 14, 2x2 merge: 576 merged tokens), each with
a small vision tower and a text model large enough that generation dominates. Both engines
get the same prepared items, the same ResPrune selection (keep; positions: contiguous for
LLaVA, the kept tokens' original M-RoPE positions for Qwen2.5-VL, the policies under which
the engines answer alike) and the same ``max_new_tokens``, in one process: each repeat times
one pass of the transformers engine then one of the vLLM engine (``answer_batch`` over all
items in batches of ``--batch``), so both see the same machine load; the min over
``--repeats`` counts, after one warm-up pass each. Per family and engine: start-up time,
items/s, time per item and its vision / selection / generation split, and whether the greedy
ids equal across engines. vLLM's CPU backend binds the process's OpenMP threads when it
starts; both engines then run on those threads. Prints a table per family and, last, one
JSON line. Not a test: numbers go to bench/RESULTS.md.

    make bench-vllm      # = .venv-vllm/bin/python bench/engines_vllm.py
    .venv-vllm/bin/python bench/engines_vllm.py --family qwen2_5_vl --items 8 --new-tokens 8
"""

# ruff: noqa: E402  (sys.path is fixed before the other imports)
from __future__ import annotations

import os
import sys

# Run as a script, bench/ is sys.path[0] and bench/select.py would shadow the stdlib `select`.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(sys.path[0])
IMAGES = sorted((ROOT / "pipeline/assets/images").glob("*.[jp][pn]g"))
QUESTIONS = [
    "What is the astronaut holding?",
    "Describe the man with the camera.",
    "What color is the cat?",
    "What is in the coffee cup?",
]
ENGINES = ("transformers", "vllm")
FAMILIES = ("llava", "qwen2_5_vl")
# per family: image size of the checkpoint (visual tokens 576 either way) and the position
# policy both engines answer alike under (resprune.engines.vllm_plugin.POSITION_POLICIES)
GEOMETRY = {"llava": (336, "contiguous"), "qwen2_5_vl": (672, "original")}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=[*FAMILIES, "all"], default="all")
    p.add_argument("--items", type=int, default=16)
    p.add_argument("--batch", type=int, default=16, help="items per answer_batch call")
    p.add_argument("--keep", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--text-hidden", type=int, default=512)
    p.add_argument("--text-layers", type=int, default=4)
    p.add_argument("--text-intermediate", type=int, default=1376)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2, help="timings are the min over repeats")
    return p.parse_args()


def build_model(args: argparse.Namespace, family: str, folder: Path) -> Path:
    from resprune.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(
        family,
        folder,
        image_size=GEOMETRY[family][0],
        text_hidden=args.text_hidden,
        text_layers=args.text_layers,
        text_intermediate=args.text_intermediate,
        heads=args.heads,
        kv_heads=args.heads,
        vision_hidden=64,
    )


def prepared_items(args: argparse.Namespace, model: Path) -> list:
    from PIL import Image

    from resprune.loading import load_preprocessor

    pre = load_preprocessor(str(model))
    pairs = [(IMAGES[i % len(IMAGES)], QUESTIONS[i % len(QUESTIONS)]) for i in range(args.items)]
    return [pre.prepare(Image.open(path).convert("RGB"), q) for path, q in pairs]


def start_engines(model: Path) -> dict[str, tuple]:
    """Per engine: its own loaded VLM (vLLM drops the LM of its copy) and the engine."""
    from resprune.engines import build_engine
    from resprune.loading import load_vlm

    out = {}
    for name in ENGINES:
        vlm = load_vlm(str(model))
        t0 = time.perf_counter()
        engine = build_engine(name, vlm)
        out[name] = (vlm, engine, time.perf_counter() - t0)
    return out


def timed_pass(
    vlm, engine, items: list, args: argparse.Namespace, policy: str
) -> tuple[float, list]:
    from resprune.answer import answer_batch
    from resprune.pruners import build_pruner

    kw = {"pruner": build_pruner("resprune"), "keep": args.keep, "engine": engine}
    kw |= {"max_new_tokens": args.new_tokens, "position_policy": policy}
    batches = [items[i : i + args.batch] for i in range(0, len(items), args.batch)]
    t0 = time.perf_counter()
    results = [r for batch in batches for r in answer_batch(vlm, batch, **kw)]
    return time.perf_counter() - t0, results


def measure(args: argparse.Namespace, family: str, model: Path) -> dict[str, dict]:
    items = prepared_items(args, model)
    engines = start_engines(model)
    best = dict.fromkeys(ENGINES, float("inf"))
    results: dict[str, list] = {}
    for repeat in range(args.repeats + 1):  # pass 0 is the warm-up
        for name, (vlm, engine, _) in engines.items():
            seconds, res = timed_pass(vlm, engine, items, args, GEOMETRY[family][1])
            if repeat and seconds < best[name]:  # the split is the fastest pass's
                best[name], results[name] = seconds, res
    rows = {}
    for name, res in results.items():
        assert all(hasattr(r, "answer_ids") for r in res), res  # no error rows
        split = {k: sum(getattr(r, k) for r in res) / len(res) for k in SPLIT}
        ids = [r.answer_ids for r in res]
        rows[name] = {"start_s": engines[name][2], "seconds": best[name], "items": len(res)}
        rows[name] |= {"new_tokens": sum(map(len, ids)), "ids": ids, **split}
    return rows


SPLIT = ("vision_s", "select_s", "generate_s")


def report(family: str, rows: dict[str, dict], args: argparse.Namespace) -> dict:
    """Print one family's table; returns its summary for the JSON line."""
    shape = f"text {args.text_hidden} x {args.text_layers} layers, keep {args.keep} of 576"
    run = f"{args.items} items, batch {args.batch}, {args.new_tokens} new tokens, greedy, CPU"
    size, policy = GEOMETRY[family]
    print(f"{family} ({size} px, {policy} positions), {shape}, {run}")
    print("| engine | start s | items/s | ms/item | vision ms | select ms | generate ms |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        per = 1000 * r["seconds"] / r["items"]
        cells = [f"{r['start_s']:.1f}", f"{r['items'] / r['seconds']:.2f}", f"{per:.1f}"]
        cells += [f"{1000 * r[k]:.1f}" for k in SPLIT]
        print(f"| {name} | {' | '.join(cells)} |")
    t, v = rows["transformers"], rows["vllm"]
    same = sum(a == b for a, b in zip(t["ids"], v["ids"], strict=True))
    ratio = t["seconds"] / v["seconds"]
    print(f"vllm / transformers throughput: {ratio:.2f}x; greedy ids equal: {same}/{t['items']}")
    engines = {k: {x: r[x] for x in r if x != "ids"} for k, r in rows.items()}
    return {"throughput_ratio": ratio, "ids_equal": same, "engines": engines}


def main() -> None:
    args = parse_args()
    families = FAMILIES if args.family == "all" else (args.family,)
    out = {}
    for family in families:
        with tempfile.TemporaryDirectory() as tmp:
            rows = measure(args, family, build_model(args, family, Path(tmp) / family))
        out[family] = report(family, rows, args)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
