"""Benchmark on one GPU: pruned vs unpruned at real 7B geometry, and the selector per call.

Needs only torch and transformers beside this checkout (no Ray, no vLLM, nothing from
pipeline/). Random bf16 weights are built on the device at the real geometry of
LLaVA-1.5-7B, LLaVA-NeXT-7B (672 px: 5 crops, 2880 tokens -> keep 320) and Qwen2.5-VL-7B
(672 px: 576 merged tokens); the tokenizer and processor are the tiny builder's, so the
vocabulary (and the LM head) is small. Everything is measured through the library's public
`resprune.answer_batch` and `resprune.select_tokens`, so whichever engine they use is what
is measured. Per model and batch (1, 8, 32 where asked, and the memory-budget batch from
`resprune.memory`: the free memory after the weights over KV + activation bytes per token,
capped by --max-batch), unpruned and pruned side by side: vision, selection, prefill (LLM)
ms, decode ms/step against the floor (weights + KV bytes once at the measured copy
bandwidth), end to end, items/s and peak memory. Then the targets of issue 10, met or
missed. Prints a table and, last, one JSON line. Sections stop at --budget-s. One engine
per model, as an actor holds one (``--cache auto``: static cache and compiled decode on
CUDA); each configuration's first call is an untimed warm-up (graph captures, compiles).
--attn defaults to flash_attention_2 when flash_attn is importable, else sdpa.

    PYTHONPATH=. python bench/gpu.py            # sized for <= 6 min on one H200 (not yet run)
    .venv/bin/python bench/gpu.py --smoke       # tiny sizes on the CPU, seconds
"""

# ruff: noqa: E402  (sys.path is fixed before the other imports)
from __future__ import annotations

import os
import sys

# Run as a script, bench/ is sys.path[0] and bench/select.py would shadow the stdlib `select`.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from resprune import answer_batch, select_tokens, tiny
from resprune.engines import build_engine
from resprune.loading import load_preprocessor
from resprune.memory import DEFAULT_CPU_BATCH_TOKENS, batch_token_budget, kv_bytes_per_token
from resprune.models import ADAPTERS, VLM
from resprune.pruners import build_pruner

ROOT = Path(sys.path[0])
QUESTIONS = [
    "What is the astronaut holding?",
    "Describe the man with the camera.",
    "What color is the cat?",
    "What is in the coffee cup?",
]
LLAMA_7B = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
}
QWEN_7B = {
    "hidden_size": 3584,
    "num_hidden_layers": 28,
    "intermediate_size": 18944,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
}
CLIP_L = {"hidden": 1024, "layers": 24, "heads": 16, "intermediate": 4096}
QWEN_VIT = {"hidden": 1280, "layers": 32, "heads": 16, "intermediate": 3420}
TINY_TEXT = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
TINY_VIT = {"hidden": 64, "layers": 2, "heads": 4, "intermediate": 128}
# (name, family, text, vision, processor image size, input image size, keep, batches)
MODELS = [
    ("llava15", "llava", LLAMA_7B, CLIP_L, 336, 336, 64, [1, 8, 32]),
    ("next", "llava_next", LLAMA_7B, CLIP_L, 336, 672, 320, [8]),
    ("qwen25vl", "qwen2_5_vl", QWEN_7B, QWEN_VIT, 672, 672, 64, [8]),
]
SMOKE_BATCH_TOKENS = 2500  # the CPU smoke run's stand-in for a GPU's memory budget
SELECT_SHAPES = [
    (1, 576, 64),
    (8, 576, 64),
    (32, 576, 64),
    (8, 576, 192),
    (32, 576, 192),
    (8, 2880, 320),
]


class Clock:
    """Wall time since start and the section deadline."""

    def __init__(self, budget_s: float):
        self.start, self.budget_s = time.perf_counter(), budget_s

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ceilings(device: torch.device, smoke: bool) -> dict:
    """Copy bandwidth (bytes read + written per second) and, on CUDA, bf16 GEMM TFLOP/s."""
    x = torch.empty((2**24 if smoke else 2**31,), dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    t = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    sync(device)
    out = {"copy_tb_s": 5 * 2 * x.numel() / (time.perf_counter() - t) / 1e12}
    if device.type == "cuda":
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        a @ a
        sync(device)
        t = time.perf_counter()
        for _ in range(10):
            a @ a
        sync(device)
        out["bf16_tflops"] = 10 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def selector(device: torch.device, smoke: bool, dtype: torch.dtype) -> list[dict]:
    """`select_tokens` ms per call (median of 10 after a warm-up call that captures)."""
    shapes = [(2, 64, 8), (2, 96, 24)] if smoke else SELECT_SHAPES
    rows = []
    for b, n, k in shapes:
        x = torch.randn(b, n, 64 if smoke else 4096, device=device, dtype=dtype)
        r = torch.rand(b, n, device=device)
        select_tokens(x, k, relevance=r)
        times = []
        for _ in range(3 if smoke else 10):
            sync(device)
            t = time.perf_counter()
            select_tokens(x, k, relevance=r)
            sync(device)
            times.append(time.perf_counter() - t)
        rows.append(
            {
                "batch": b,
                "n": n,
                "dim": x.shape[-1],
                "k": k,
                "ms_per_call": 1e3 * statistics.median(times),
            }
        )
        print(f"select [{b}, {n}, {x.shape[-1]}] k={k}: {rows[-1]['ms_per_call']:.2f} ms/call")
    return rows


def build(family: str, text: dict, vit: dict, size: int, device, dtype, attn: str):
    """A random-weight VLM of the given geometry on ``device`` and the tiny preprocessor."""
    path = tiny.build_tiny_checkpoint(family, Path(tempfile.mkdtemp()) / family, image_size=size)
    pre = load_preprocessor(str(path))
    tok = pre.processor.tokenizer
    vision = {"hidden_size": vit["hidden"], "layers": vit["layers"], "image_size": size}
    text = {**text, "vocab_size": len(tok)}
    qwen = family == "qwen2_5_vl"
    config, _ = tiny._qwen(tok, text, vision) if qwen else tiny._llava(family, tok, text, vision)
    vc = config.vision_config
    vc.intermediate_size = vit["intermediate"]
    if qwen:
        vc.num_heads = vit["heads"]
        vc.fullatt_block_indexes = [i for i in range(vit["layers"]) if i % 8 == 7]
    else:
        vc.num_attention_heads = vit["heads"]
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(
            config, dtype=dtype, attn_implementation=attn
        )
    model.eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = None  # decode exactly the asked number of tokens
    return VLM(family, model, tok, ADAPTERS[family], f"{family}-random", device), pre


def run(vlm: VLM, items: list, keep: int | None, new_tokens: int, engine) -> dict:
    """One `answer_batch` call: wall seconds, its parts, prompt length, peak memory."""
    if vlm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(vlm.device)
    pruner = build_pruner("resprune") if keep else None
    sync(vlm.device)
    t = time.perf_counter()
    out = answer_batch(
        vlm, items, pruner=pruner, keep=keep or 1.0, max_new_tokens=new_tokens, engine=engine
    )
    sync(vlm.device)
    wall = time.perf_counter() - t
    bad = [o for o in out if not hasattr(o, "answer")]
    if bad:
        raise RuntimeError(f"item errors: {bad[:2]}")
    peak = torch.cuda.max_memory_allocated(vlm.device) if vlm.device.type == "cuda" else 0
    parts = {
        key: sum(getattr(o, key) for o in out) for key in ("vision_s", "select_s", "generate_s")
    }
    return {
        "wall": wall,
        **parts,
        "prompt_len": max(o.prompt_tokens for o in out),
        "visual": out[0].visual_tokens,
        "kept": out[0].kept_tokens,
        "peak": peak,
    }


def measure(vlm, engine, items, keep, new_tokens, repeats, bandwidth) -> dict:
    """Prefill (1 new token) and end-to-end (``new_tokens``) timings, min over repeats."""
    if vlm.device.type == "cuda":  # warm-up: CUDA-graph captures, compiled decode shapes
        run(vlm, items, keep, new_tokens, engine)
    pre = [run(vlm, items, keep, 1, engine) for _ in range(repeats)]
    e2e = [run(vlm, items, keep, new_tokens, engine) for _ in range(repeats)]
    b, shape = len(items), vlm.describe()
    best = min(e2e, key=lambda r: r["wall"])
    prefill = min(r["generate_s"] for r in pre)
    decode = (min(r["generate_s"] for r in e2e) - prefill) / max(1, new_tokens - 1)
    kv = kv_bytes_per_token(vlm.model.config.text_config, vlm.model.dtype)
    read = shape["text_parameters"] * vlm.model.dtype.itemsize
    read += kv * b * (best["prompt_len"] + new_tokens / 2)
    return {
        "batch": b,
        "keep": keep or "all",
        "visual_tokens": best["visual"],
        "kept_tokens": best["kept"],
        "prompt_len": best["prompt_len"],
        "vision_ms": 1e3 * min(r["vision_s"] for r in pre),
        "select_ms": 1e3 * min(r["select_s"] for r in pre),
        "prefill_ms": 1e3 * prefill,
        "decode_ms_step": 1e3 * decode,
        "decode_floor_ms": 1e3 * read / (bandwidth * 1e12),
        "e2e_s": best["wall"],
        "items_per_s": b / best["wall"],
        "peak_gib": max(r["peak"] for r in e2e) / 2**30,
    }


def budget_batch(vlm, cost_tokens: int, smoke: bool, cap: int) -> tuple[int, int]:
    """(items the memory budget holds at this cost, items measured after the cap)."""
    if vlm.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(vlm.device)
        tokens = batch_token_budget(free, vlm.model.config.text_config, vlm.model.dtype)
    else:
        tokens = SMOKE_BATCH_TOKENS if smoke else DEFAULT_CPU_BATCH_TOKENS
    fits = max(1, tokens // cost_tokens)
    return fits, min(fits, cap)


def model_section(spec, args, device, dtype, bandwidth, clock) -> dict:
    """Unpruned and pruned rows for each batch of one model, then its memory-budget batch."""
    name, family, text, vit, size, image_size, keep, batches = spec
    if args.smoke:
        text, vit, batches, keep = TINY_TEXT, TINY_VIT, [2], {"llava_next": 40}.get(family, 16)
        size, image_size = (336, 336) if family == "qwen2_5_vl" else (size, image_size)
    vlm, pre = build(family, text, vit, size, device, dtype, args.attn)
    engine = build_engine("transformers", vlm, cache=args.cache)  # one per model, as an actor
    pics = [
        Image.open(p).convert("RGB").resize((image_size, image_size))
        for p in sorted((ROOT / "pipeline/assets/images").glob("*.jpg"))
    ]
    distinct = [pre.prepare(pics[i % len(pics)], QUESTIONS[i % 4]) for i in range(8)]
    rows, repeats = [], 1 if args.smoke else 2
    for b in batches:
        items = [distinct[i % 8] for i in range(b)]
        for k in (None, keep):
            if clock.left() < 0:
                return {"rows": rows, "cut": "budget"}
            rows.append(measure(vlm, engine, items, k, args.new_tokens, repeats, bandwidth))
            print(format_row(name, rows[-1]), flush=True)
    budget = {}
    for k in (None, keep):
        cost = next(r["prompt_len"] for r in rows if r["keep"] == (k or "all")) + args.new_tokens
        fits, b = budget_batch(vlm, cost, args.smoke, args.max_batch)
        budget[k or "all"] = fits
        if clock.left() < 0:
            return {"rows": rows, "budget_items": budget, "cut": "budget"}
        try:
            items = [distinct[i % 8] for i in range(b)]
            row = measure(vlm, engine, items, k, args.new_tokens, 1, bandwidth)
        except torch.cuda.OutOfMemoryError as err:
            row = {"batch": b, "keep": k or "all", "error": f"out of memory: {err}"[:200]}
        rows.append({**row, "memory_budget": True, "budget_items": fits})
        print(format_row(name, rows[-1]), flush=True)
    del vlm, engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"rows": rows, "budget_items": budget}


def format_row(name: str, r: dict) -> str:
    if "error" in r:
        return f"{name:>9} b={r['batch']:<4} keep={r['keep']!s:<4} {r['error']}"
    tag = " (memory budget)" if r.get("memory_budget") else ""
    return (
        f"{name:>9} b={r['batch']:<4} keep={r['keep']!s:<4} tok={r['prompt_len']:<5}"
        f" vision {r['vision_ms']:8.1f} | select {r['select_ms']:7.1f} | prefill"
        f" {r['prefill_ms']:8.1f} ms | decode {r['decode_ms_step']:6.1f} (floor"
        f" {r['decode_floor_ms']:5.1f}) ms/step | e2e {r['e2e_s']:7.3f} s |"
        f" {r['items_per_s']:7.1f} items/s | peak {r['peak_gib']:6.1f} GiB{tag}"
    )


def pair(rows: list[dict], batch: int | None, budget: bool = False) -> tuple[dict, dict] | None:
    """(unpruned, pruned) rows of one batch size, or of the memory-budget runs."""
    pick = [
        r
        for r in rows
        if "error" not in r
        and bool(r.get("memory_budget")) == budget
        and (budget or r["batch"] == batch)
    ]
    return (pick[0], pick[1]) if len(pick) == 2 else None


def targets(results: dict) -> list[dict]:
    """Issue 10's targets, each met, missed, or not measured (None)."""
    sel = {(r["batch"], r["n"], r["k"]): r["ms_per_call"] for r in results["selector"]}
    llava = results["models"].get("llava15", {}).get("rows", [])
    nxt = results["models"].get("next", {}).get("rows", [])
    out = [("selector ms/call [32,576,4096] k=64", sel.get((32, 576, 64)), "<=", 1.5)]
    for b in (8, 32):
        p = pair(llava, b)
        out.append(
            (
                f"llava15 b{b} selection share of e2e",
                p and p[1]["select_ms"] / 1e3 / p[1]["e2e_s"],
                "<=",
                0.02,
            )
        )
        out.append(
            (
                f"llava15 b{b} decode / floor",
                p and p[1]["decode_ms_step"] / p[1]["decode_floor_ms"],
                "<=",
                1.5,
            )
        )
    p32, pn, pb = pair(llava, 32), pair(nxt, 8), pair(llava, None, budget=True)
    out.append(("llava15 b32 e2e speedup", p32 and p32[0]["e2e_s"] / p32[1]["e2e_s"], ">=", 2.5))
    out.append(("next b8 e2e speedup", pn and pn[0]["e2e_s"] / pn[1]["e2e_s"], ">=", 3.0))
    out.append(("llava15 memory-budget items/s", pb and pb[1]["items_per_s"], ">=", 150.0))
    return [
        {
            "target": t,
            "value": v,
            "want": f"{op} {want}",
            "met": None if v is None else (v <= want if op == "<=" else v >= want),
        }
        for t, v, op, want in out
    ]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, seconds")
    p.add_argument("--only", nargs="*", help="model sections to run: llava15 next qwen25vl")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=256, help="cap of the memory-budget batch")
    p.add_argument("--budget-s", type=float, default=330.0, help="stop starting sections after")
    flash = importlib.util.find_spec("flash_attn") is not None
    p.add_argument("--attn", default="flash_attention_2" if flash else "sdpa")
    p.add_argument(
        "--cache", default="auto", help="engine KV cache: auto (static on CUDA), static or dynamic"
    )
    return p.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.smoke:
        args.new_tokens, args.max_batch, args.attn = 2, 4, "sdpa"
    clock = Clock(args.budget_s)
    import transformers

    results = {
        "bench": "gpu",
        "device": str(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "attn": args.attn,
        "smoke": args.smoke,
        "ceilings": ceilings(device, args.smoke),
        "models": {},
    }
    print(json.dumps(results["ceilings"]), flush=True)
    results["selector"] = selector(device, args.smoke, dtype)
    for spec in MODELS:
        if args.only and spec[0] not in args.only:
            continue
        if clock.left() < 0:
            results["models"][spec[0]] = {"skipped": "budget"}
            continue
        bandwidth = results["ceilings"]["copy_tb_s"]
        results["models"][spec[0]] = model_section(spec, args, device, dtype, bandwidth, clock)
    results["targets"] = targets(results)
    for t in results["targets"]:
        t["met"] = None if args.smoke else t["met"]  # tiny sizes on a CPU say nothing
        verdict = {None: "not measured", True: "met", False: "MISSED"}[t["met"]]
        value = "-" if t["value"] is None else f"{t['value']:.3f}"
        print(f"target {t['target']:<40} {value:>9} (want {t['want']}): {verdict}")
    results["wall_s"] = time.perf_counter() - clock.start
    print(json.dumps(results, default=str))


if __name__ == "__main__":
    main()
