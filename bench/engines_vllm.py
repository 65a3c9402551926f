"""Benchmark: the transformers engine vs the vLLM engine on the same pruned items, side by side.

Random weights, LLaVA-1.5 geometry (336 px, patch 14: 576 visual tokens) with a small vision
tower and a text model large enough that generation dominates. Both engines get the same
prepared items, the same ResPrune selection (keep, contiguous positions) and the same
``max_new_tokens``; each runs in its own subprocess (vLLM's CPU backend pins the threads of
the process it runs in). Per engine: start-up time, then ``answer_batch`` over all items in
batches of ``--batch`` (one warm-up pass discarded, min over ``--repeats``): items/s, time per
item, and its vision / selection / generation split. Greedy ids are compared across engines.
Prints a table and, last, one JSON line. Not a test: numbers go to bench/RESULTS.md.

    make bench-vllm      # = .venv-vllm/bin/python bench/engines_vllm.py (~4 min, 2 cores)
    .venv-vllm/bin/python bench/engines_vllm.py --items 8 --new-tokens 8   # quick look
"""

# ruff: noqa: E402  (sys.path is fixed before the other imports)
from __future__ import annotations

import os
import sys

# Run as a script, bench/ is sys.path[0] and bench/select.py would shadow the stdlib `select`.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import subprocess
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


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=32)
    p.add_argument("--batch", type=int, default=16, help="items per answer_batch call")
    p.add_argument("--keep", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--text-hidden", type=int, default=512)
    p.add_argument("--text-layers", type=int, default=4)
    p.add_argument("--text-intermediate", type=int, default=1376)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2, help="timings are the min over repeats")
    p.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args()


def build_model(args: argparse.Namespace, folder: Path) -> Path:
    from resprune.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(
        "llava",
        folder,
        text_hidden=args.text_hidden,
        text_layers=args.text_layers,
        text_intermediate=args.text_intermediate,
        heads=args.heads,
        kv_heads=args.heads,
        vision_hidden=64,
    )


def worker(args: argparse.Namespace) -> dict:
    """One engine in this process: start it, then time answer_batch over the items."""
    from PIL import Image

    from resprune.answer import answer_batch
    from resprune.engines import build_engine
    from resprune.loading import load_preprocessor, load_vlm
    from resprune.pruners import build_pruner

    pre = load_preprocessor(args.model)
    pairs = [(IMAGES[i % len(IMAGES)], QUESTIONS[i % len(QUESTIONS)]) for i in range(args.items)]
    items = [pre.prepare(Image.open(path).convert("RGB"), q) for path, q in pairs]
    vlm = load_vlm(args.model)
    t0 = time.perf_counter()
    engine = build_engine(args.worker, vlm)
    start_s = time.perf_counter() - t0
    kw = {"pruner": build_pruner("resprune"), "keep": args.keep, "engine": engine}
    kw |= {"max_new_tokens": args.new_tokens, "position_policy": "contiguous"}
    batches = [items[i : i + args.batch] for i in range(0, len(items), args.batch)]
    answer_batch(vlm, batches[0], **kw)  # warm-up, discarded
    best, results = float("inf"), []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        results = [r for b in batches for r in answer_batch(vlm, b, **kw)]
        best = min(best, time.perf_counter() - t0)
    split = {k: sum(getattr(r, k) for r in results) / len(results) for k in SPLIT}
    return {
        "engine": args.worker,
        "start_s": start_s,
        "seconds": best,
        "items": len(items),
        "new_tokens": sum(r.new_tokens for r in results),
        "ids": [r.answer_ids for r in results],
        **split,
    }


SPLIT = ("vision_s", "select_s", "generate_s")


def run_engine(engine: str, model: Path, args: argparse.Namespace) -> dict:
    out = model.parent / f"{engine}.json"
    cmd = [sys.executable, __file__, "--worker", engine, "--model", str(model), "--out", str(out)]
    for key in ("items", "batch", "keep", "new_tokens", "repeats"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{engine} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def report(rows: dict[str, dict], args: argparse.Namespace) -> None:
    shape = f"text {args.text_hidden} x {args.text_layers} layers, keep {args.keep} of 576"
    run = f"{args.items} items, batch {args.batch}, {args.new_tokens} new tokens, greedy, CPU"
    print(f"LLaVA-1.5 geometry, {shape}, {run}")
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
    summary = {k: {x: r[x] for x in r if x != "ids"} for k, r in rows.items()}
    print(json.dumps({"throughput_ratio": ratio, "ids_equal": same, "engines": summary}))


def main() -> None:
    args = parse_args()
    if args.worker:
        Path(args.out).write_text(json.dumps(worker(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(args, Path(tmp) / "llava")
        rows = {name: run_engine(name, model, args) for name in ENGINES}
    report(rows, args)


if __name__ == "__main__":
    main()
