"""Benchmark: generation engines side by side on the same kept sequences (same run, same items).

One random-weight LLaVA-1.5-geometry model (LLM-dominated, as in bench/generate.py); per
(batch, keep) config, selection runs once and every engine variant generates from the same
plans: wall time of ``engine.generate`` with ``--new-tokens`` tokens (EOS off, so every
variant decodes the same count) and with 1 token (the prefill), decode ms per step from the
two, items/s, the ratio to the dynamic-cache baseline, and whether the ids equal the
baseline's. Variants: ``dynamic`` (transformers' default cache), ``static`` (preallocated
cache, exact shapes), ``static+bucket`` (batch and cache length rounded up to buckets: the
GPU configuration; on CUDA ``static*`` also compile the decode step). Timings are the min
over ``--repeats`` after one warm-up call per shape. Prints a table and, last, one JSON line.

    .venv/bin/python bench/engines.py            # text 1024 x 8 layers
    .venv/bin/python bench/engines.py --quick    # text 512 x 4 layers, batch 8 only
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
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from bench.generate import IMAGES, QUESTIONS
from resprune.answer import answer_batch
from resprune.engines import Engine, Generation
from resprune.engines.hf import TransformersEngine
from resprune.loading import load_preprocessor, load_vlm
from resprune.models.base import sync
from resprune.pruners import build_pruner
from resprune.tiny import build_tiny_checkpoint

VARIANTS: dict[str, Callable[..., Engine]] = {
    "dynamic": lambda vlm: TransformersEngine(vlm, cache="dynamic"),
    "static": lambda vlm: TransformersEngine(vlm, cache="static", bucket=False),
    "static+bucket": lambda vlm: TransformersEngine(vlm, cache="static", bucket=True),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller text model, batch 8 only")
    p.add_argument("--text-hidden", type=int, default=1024)
    p.add_argument("--text-layers", type=int, default=8)
    p.add_argument("--text-intermediate", type=int, default=2752)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--keeps", type=int, nargs="+", default=[64, 0], help="0: keep all")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--engines", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=2, help="timings are the min over repeats")
    args = p.parse_args()
    if args.quick:
        args.text_hidden, args.text_layers, args.text_intermediate = 512, 4, 1376
        args.batch_sizes = [8]
    return args


class Capture:
    """An engine that only keeps the plans it is given (selection runs once per config)."""

    name = "capture"

    def generate(self, plans, max_new_tokens):
        self.plans = list(plans)
        return [Generation("", [0]) for _ in plans]


def plans_for(vlm, pre, batch: int, keep: int) -> list:
    pictures = [Image.open(p).convert("RGB") for p in IMAGES]
    items = [pre.prepare(pictures[i % len(pictures)], QUESTIONS[i % 8]) for i in range(batch)]
    capture = Capture()
    pruner = build_pruner("resprune") if keep else None
    answer_batch(vlm, items, pruner=pruner, keep=keep or 1.0, max_new_tokens=1, engine=capture)
    return capture.plans


def timed(vlm, engine: Engine, plans: list, new: int, repeats: int) -> tuple[float, list]:
    """Min wall seconds of ``engine.generate`` over ``repeats`` (after one warm-up call)."""
    out = engine.generate(plans, new)
    best = float("inf")
    for _ in range(repeats):
        sync(vlm.device)
        t0 = time.perf_counter()
        out = engine.generate(plans, new)
        sync(vlm.device)
        best = min(best, time.perf_counter() - t0)
    return best, [g.token_ids for g in out]


def run_config(vlm, pre, args, batch: int, keep: int) -> list[dict]:
    plans = plans_for(vlm, pre, batch, keep)
    rows, base = [], None
    for name in args.engines:
        engine = VARIANTS[name](vlm)
        prefill_s, _ = timed(vlm, engine, plans, 1, args.repeats)
        e2e_s, ids = timed(vlm, engine, plans, args.new_tokens, args.repeats)
        row = {
            "batch": batch,
            "keep": keep or "all",
            "engine": name,
            "prompt_len": max(len(p.ids) for p in plans),
            "prefill_s": prefill_s,
            "e2e_s": e2e_s,
            "decode_ms_step": 1e3 * (e2e_s - prefill_s) / (args.new_tokens - 1),
            "items_per_s": batch / e2e_s,
            "ms_per_item": 1e3 * e2e_s / batch,
        }
        base = base or (row, ids)
        row["speedup_vs_dynamic"] = base[0]["e2e_s"] / e2e_s
        row["ids_equal_baseline"] = ids == base[1]
        rows.append(row)
        print(f"  done batch={batch} keep={keep or 'all'} {name}", file=sys.stderr, flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    cols = [
        ("batch", "{:>5}"),
        ("keep", "{:>4}"),
        ("engine", "{:>13}"),
        ("prompt_len", "{:>6}"),
        ("prefill_s", "{:>8.3f}"),
        ("e2e_s", "{:>7.3f}"),
        ("decode_ms_step", "{:>8.2f}"),
        ("ms_per_item", "{:>8.1f}"),
        ("items_per_s", "{:>7.2f}"),
        ("speedup_vs_dynamic", "{:>7.2f}"),
        ("ids_equal_baseline", "{!s:>5}"),
    ]
    print(" | ".join(name for name, _ in cols))
    for r in rows:
        print(" | ".join(fmt.format(r[name]) for name, fmt in cols))


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_checkpoint(
            "llava",
            Path(tmp) / "m",
            text_hidden=args.text_hidden,
            text_layers=args.text_layers,
            text_intermediate=args.text_intermediate,
            heads=8,
            kv_heads=8,
            vision_hidden=128,
            vision_layers=2,
            image_size=336,
        )
        vlm = load_vlm(str(path), dtype=args.dtype, device=args.device)
        vlm.model.generation_config.eos_token_id = None  # decode exactly new_tokens everywhere
        pre = load_preprocessor(str(path))
        rows = [
            r
            for b in args.batch_sizes
            for k in args.keeps
            for r in run_config(vlm, pre, args, b, k)
        ]
    shape = vlm.describe()
    print(
        f"model: {shape['parameters']:,} parameters, text hidden {shape['hidden_size']} x "
        f"{shape['num_layers']} layers; device {args.device}, {args.dtype}, {os.cpu_count()} "
        f"CPUs, torch threads {torch.get_num_threads()}, {args.new_tokens} new tokens"
    )
    print_table(rows)
    print(json.dumps({"model": shape, "new_tokens": args.new_tokens, "rows": rows}))


if __name__ == "__main__":
    main()
