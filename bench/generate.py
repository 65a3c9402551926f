"""Benchmark: pruned vs unpruned batched generation on an LLM-dominated LLaVA-1.5-geometry model.

Random weights, LLaVA-1.5 geometry (336 px, patch 14: 576 visual tokens, layer -2 features,
2-layer projector), a small vision tower and a text model large enough that its prefill
dominates. Every (batch, keep) config runs in a fresh subprocess so its peak RSS delta is its
own (tracemalloc does not see torch's allocations); on CUDA, torch.cuda.max_memory_allocated.
Prefill = `answer_batch` with 1 new token (LLM part, from the item timings); end-to-end = with
``--new-tokens`` tokens (EOS disabled so every config decodes the same number). The FLOPs
ratio counts the LLM prefill on the padded batch: linear layers plus causal attention.
Prints a table and, last, one JSON line. Not a test: numbers go to bench/RESULTS.md.

    .venv/bin/python bench/generate.py            # text 1024 x 8 layers (~5 min on 2 cores)
    .venv/bin/python bench/generate.py --quick    # text 512 x 4 layers (~1 min)
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
import threading
import time
from pathlib import Path

ROOT = Path(sys.path[0])
IMAGES = sorted((ROOT / "pipeline/assets/images").glob("*.[jp][pn]g"))
QUESTIONS = [
    "What is the astronaut holding?",
    "Describe the man with the camera.",
    "What color is the cat?",
    "What is in the coffee cup?",
    "What does the stained tissue show?",
    "Where is the rocket going?",
    "How many people are in the image?",
    "What is on the table?",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller text model, batch 8 only")
    p.add_argument("--text-hidden", type=int, default=1024)
    p.add_argument("--text-layers", type=int, default=8)
    p.add_argument("--text-intermediate", type=int, default=2752)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vision-hidden", type=int, default=128)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--keeps", type=int, nargs="+", default=[64, 128, 192])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=2, help="timings are the min over repeats")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.text_hidden, args.text_layers, args.text_intermediate = 512, 4, 1376
        args.batch_sizes = [8]
    return args


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def prefill_flops(shape: dict, batch: int, length: int) -> float:
    """LLM prefill FLOPs of a padded batch: linear layers + causal attention + last-token head."""
    h, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_layers"]
    kv_dim = h // shape["num_heads"] * shape["num_kv_heads"]
    linear = 2 * (2 * h * h + 2 * h * kv_dim + 3 * h * inter) * length
    attention = 2 * 2 * h * length * (length + 1) / 2  # QK^T and AV over the causal half
    return batch * (layers * (linear + attention) + 2 * h * shape["vocab"])


class PeakRSS:
    """Samples this process's RSS every 2 ms; ``peak`` is the max seen (bytes)."""

    def __enter__(self) -> PeakRSS:
        self.peak, self._stop = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(cfg: dict) -> dict:
    """One (batch, keep) config in this fresh process; returns its measurements."""
    import torch
    from PIL import Image

    from resprune.answer import answer_batch
    from resprune.loading import load_preprocessor, load_vlm
    from resprune.pruners import build_pruner

    vlm = load_vlm(cfg["path"], dtype=cfg["dtype"], device=cfg["device"])
    vlm.model.generation_config.eos_token_id = None  # decode exactly new_tokens everywhere
    pre = load_preprocessor(cfg["path"])
    pictures = [Image.open(p).convert("RGB") for p in IMAGES]
    b = cfg["batch"]
    items = [pre.prepare(pictures[i % len(pictures)], QUESTIONS[i % 8]) for i in range(b)]
    keep = cfg["keep"] or 576
    pruner = build_pruner("resprune") if cfg["keep"] else None

    def run(subset, n):
        return answer_batch(vlm, subset, pruner=pruner, keep=keep, max_new_tokens=n)

    run(items[:1], 2)  # warm-up: kernels, allocator, lazy init
    cuda = vlm.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else _rss()
    prefill, e2e, e2e_s = [], [], []
    with PeakRSS() as rss:  # min over repeats: robust to other load on a shared machine
        for _ in range(cfg["repeats"]):
            prefill.append(run(items, 1))
            t0 = time.perf_counter()
            e2e.append(run(items, cfg["new_tokens"]))
            e2e_s.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if cuda else rss.peak) - base
    total = lambda runs, key: min(sum(getattr(r, key) for r in rs) for rs in runs)  # noqa: E731
    return {
        "batch": b,
        "keep": cfg["keep"],
        "kept_tokens": e2e[0][0].kept_tokens,
        "prompt_len": max(r.prompt_tokens for r in e2e[0]),
        "prefill_s": total(prefill, "generate_s"),
        "vision_s": total(prefill, "vision_s"),
        "select_s": total(prefill + e2e, "select_s"),
        "e2e_s": min(e2e_s),
        "new_tokens": e2e[0][0].new_tokens,
        "peak_mb": peak / 2**20,
        "shape": vlm.describe(),
    }


def run_config(args: argparse.Namespace, path: Path, batch: int, keep: int) -> dict:
    cfg = {"path": str(path), "batch": batch, "keep": keep, "new_tokens": args.new_tokens}
    cfg |= {"device": args.device, "dtype": args.dtype, "repeats": args.repeats}
    out = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(cfg)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def add_ratios(rows: list[dict]) -> None:
    """Speedups, FLOPs ratios and memory ratios against the unpruned row of the same batch."""
    for r in rows:
        ref = next(x for x in rows if x["batch"] == r["batch"] and x["keep"] == 0)
        shape = r["shape"]
        flops = prefill_flops(shape, r["batch"], r["prompt_len"])
        r["flops_ratio"] = prefill_flops(shape, ref["batch"], ref["prompt_len"]) / flops
        r["prefill_speedup"] = ref["prefill_s"] / r["prefill_s"]
        r["speedup_vs_flops"] = r["prefill_speedup"] / r["flops_ratio"]
        r["e2e_speedup"] = ref["e2e_s"] / r["e2e_s"]
        r["select_share"] = r["select_s"] / r["e2e_s"]
        r["mem_ratio"] = r["peak_mb"] / ref["peak_mb"]


def print_table(rows: list[dict]) -> None:
    cols = [
        ("batch", "{:>5}"),
        ("keep", "{:>5}"),
        ("prompt_len", "{:>6}"),
        ("prefill_s", "{:>8.3f}"),
        ("prefill_speedup", "{:>7.2f}"),
        ("flops_ratio", "{:>7.2f}"),
        ("speedup_vs_flops", "{:>7.2f}"),
        ("e2e_s", "{:>7.2f}"),
        ("e2e_speedup", "{:>7.2f}"),
        ("select_s", "{:>8.4f}"),
        ("select_share", "{:>7.2%}"),
        ("peak_mb", "{:>8.1f}"),
        ("mem_ratio", "{:>6.2f}"),
    ]
    print(" | ".join(name for name, _ in cols))
    for r in rows:
        print(" | ".join(fmt.format(r[name]) for name, fmt in cols))


def targets(rows: list[dict]) -> dict:
    """The issue's targets at batch 8, keep 64."""
    r = next((x for x in rows if x["batch"] == 8 and x["keep"] == 64), None)
    if r is None:
        return {}
    return {
        "prefill_speedup_ge_0.9x_flops_ratio": r["speedup_vs_flops"] >= 0.9,
        "selection_le_2pct_of_item_time": r["select_share"] <= 0.02,
        "peak_memory_ratio_le_0.65": r["mem_ratio"] <= 0.65,
    }


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    from resprune.tiny import build_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_checkpoint(
            "llava",
            Path(tmp) / "m",
            text_hidden=args.text_hidden,
            text_layers=args.text_layers,
            text_intermediate=args.text_intermediate,
            heads=args.heads,
            kv_heads=args.heads,
            vision_hidden=args.vision_hidden,
            vision_layers=2,
            image_size=336,
        )
        rows = []
        for batch in args.batch_sizes:
            for keep in [0, *args.keeps]:
                rows.append(run_config(args, path, batch, keep))
                print(f"  done batch={batch} keep={keep or 'all'}", file=sys.stderr, flush=True)
    shape = rows[0]["shape"]
    print(
        f"model: {shape['parameters']:,} parameters ({shape['text_parameters']:,} text, "
        f"{shape['vision_parameters']:,} vision); text hidden {shape['hidden_size']}, "
        f"{shape['num_layers']} layers; device {args.device}, {args.dtype}, "
        f"{os.cpu_count()} CPUs, torch threads {__import__('torch').get_num_threads()}"
    )
    add_ratios(rows)
    print_table(rows)
    for r in rows:
        r.pop("shape")
    print(json.dumps({"model": shape, "rows": rows, "targets": targets(rows)}))


if __name__ == "__main__":
    main()
