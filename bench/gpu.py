"""Benchmark on one GPU: pruned vs unpruned at real 7B geometry, and the selector per call.

Needs only torch and transformers beside this checkout (no Ray, no vLLM, nothing from
pipeline/). Random bf16 weights are built on the device at the real geometry of
LLaVA-1.5-7B, LLaVA-NeXT-7B (672 px: 5 crops, 2880 tokens -> keep 320) and Qwen2.5-VL-7B
(672 px: 576 merged tokens); the tokenizer and processor are the tiny builder's, so the
vocabulary (and the LM head) is small. Everything is measured through the library's public
`resprune.answer_batch` and `resprune.select_tokens`, so whichever engine they use is what
is measured. Per model, the rows its targets need (LLaVA-1.5: batch 8 pruned, batch 32
unpruned and pruned, and the pruned memory-budget batch from `resprune.memory`, capped by
--max-batch; NeXT and Qwen: batch 8 unpruned and pruned): vision, selection, prefill (LLM)
ms, decode ms/step against the floor (weights + KV bytes once at the measured copy
bandwidth), end to end, items/s and peak memory. Then the targets of issue 10, met or missed.

Built to survive its first GPU: sdpa by default (--attn); each section (ceilings, selector,
each model) prints one JSON line, flushed, as it finishes, and a section that raises prints
its error and the next one runs, so a crash loses nothing already measured; gc (and the
CUDA caching allocator, and compiled graphs) are freed between sections. Compile and
capture are reported per shape, never inside a timing: the engine warms up each new (batch
bucket, cache length) shape before its first batch (`resprune.overhead`), and the selector's
first call per shape is reported as ``capture_ms`` (its capture and compile are counted
overhead too, `resprune.select`). The decode is compiled with dynamic dimensions: at most
`resprune.engines.hf.COMPILES_PER_PROCESS` (2) inductor compiles per process, one CUDA-graph
capture per shape (8 shapes: 4 + 2 + 2), so the three families fit in about 6 minutes with
compiles counted (not yet measured); sections stop being started at --budget-s, and a row is
cut when the time left is below the last compile plus the last row. Each row also gives the
memory model's estimate (`resprune.memory.BatchMemory`) beside the batch's measured peak
above what was allocated before it. The last line is every section in one JSON object, with
the overhead per label and the number of graphs dynamo compiled.

    PYTHONPATH=. python bench/gpu.py            # one H200, <= 6 min (not yet run on a GPU)
    .venv/bin/python bench/gpu.py --smoke       # tiny sizes forced onto the CPU, seconds

`--smoke` forces the CPU at tiny sizes and checks only that every section runs end to end
(tests/test_bench_gpu.py runs it in the suite): it tests none of the GPU behaviour (no CUDA
graphs, no compiled decode, no memory budget, no GPU kernels). The GPU checks are
`python -m pytest -m gpu` on a CUDA machine (tests/test_gpu.py; README "Tests").
"""

# ruff: noqa: E402  (sys.path is fixed before the other imports)
from __future__ import annotations

import os
import sys

# Run as a script, bench/ is sys.path[0] and bench/select.py would shadow the stdlib `select`.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch._dynamo.utils import counters
from transformers import AutoModelForImageTextToText

from resprune import answer_batch, overhead, select_tokens, tiny
from resprune.engines import build_engine
from resprune.loading import load_preprocessor
from resprune.memory import (
    DEFAULT_CPU_BATCH_TOKENS,
    BatchMemory,
    BatchShape,
    batch_token_budget,
    kv_bytes_per_token,
)
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
# (name, family, text, vision, processor image size, input image size, keep,
#  rows: (batch, which of unpruned (None) and pruned ("keep") it runs), memory-budget rows).
# Every row with new tokens is one compiled decode shape (batch bucket x cache length): 8 in
# all, what the targets need, so the three families fit in <= 6 min with compiles counted.
MODELS = [
    (
        "llava15",
        "llava",
        LLAMA_7B,
        CLIP_L,
        336,
        336,
        64,
        [(8, ("keep",)), (32, (None, "keep"))],
        ("keep",),
    ),
    ("next", "llava_next", LLAMA_7B, CLIP_L, 336, 672, 320, [(8, (None, "keep"))], ()),
    ("qwen25vl", "qwen2_5_vl", QWEN_7B, QWEN_VIT, 672, 672, 64, [(8, (None, "keep"))], ()),
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
    """`select_tokens` ms per call (median of 10) and its first call's extra (CUDA-graph
    capture, compiles) as ``capture_ms``."""
    shapes = [(2, 64, 8), (2, 96, 24)] if smoke else SELECT_SHAPES
    rows = []
    for b, n, k in shapes:
        x = torch.randn(b, n, 64 if smoke else 4096, device=device, dtype=dtype)
        r = torch.rand(b, n, device=device)
        first = timed(device, lambda x=x, k=k, r=r: select_tokens(x, k, relevance=r))
        times = [
            timed(device, lambda x=x, k=k, r=r: select_tokens(x, k, relevance=r))
            for _ in range(3 if smoke else 10)
        ]
        ms = 1e3 * statistics.median(times)
        rows.append(
            {
                "batch": b,
                "n": n,
                "dim": x.shape[-1],
                "k": k,
                "ms_per_call": ms,
                "capture_ms": max(0.0, 1e3 * first - ms),
            }
        )
        print(
            f"select [{b}, {n}, {x.shape[-1]}] k={k}: {ms:.2f} ms/call "
            f"(first call +{rows[-1]['capture_ms']:.0f} ms)",
            flush=True,
        )
    return rows


def timed(device: torch.device, fn) -> float:
    """Seconds of one call, the device synchronised on both sides."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def build(family: str, text: dict, vit: dict, size: int, device, dtype, attn: str):
    """A random-weight VLM of the given geometry on ``device`` and the tiny preprocessor."""
    path = tiny.build_tiny_checkpoint(family, Path(tempfile.mkdtemp()) / family, image_size=size)
    pre = load_preprocessor(str(path))
    tok = pre.processor.tokenizer
    vision = {"hidden_size": vit["hidden"], "layers": vit["layers"], "image_size": size}
    text = {**text, "vocab_size": len(tok)}
    qwen = family == "qwen2_5_vl"
    config, _ = (
        tiny._qwen(family, tok, text, vision) if qwen else tiny._llava(family, tok, text, vision)
    )
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
    """One `answer_batch` call: wall seconds, its parts, prompt length, peak memory (above
    what was allocated before) and the memory model's estimate of it."""
    base = 0
    if vlm.device.type == "cuda":
        sync(vlm.device)
        base = torch.cuda.memory_allocated(vlm.device)
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
    peak = torch.cuda.max_memory_allocated(vlm.device) - base if vlm.device.type == "cuda" else 0
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
        "estimate": estimate(vlm, engine, items, out, keep, new_tokens),
    }


def estimate(vlm: VLM, engine, items: list, out: list, keep, new_tokens: int) -> int:
    """`resprune.memory.BatchMemory`'s bytes for this batch (what the packer would charge)."""
    memory = BatchMemory(
        vlm.model.config,
        vlm.model.dtype,
        max_new_tokens=new_tokens,
        static_cache=getattr(engine, "static", False),
        bucketed=getattr(engine, "bucket", False),
        cuda_graphs=vlm.device.type == "cuda",
    )
    shape = BatchShape()
    for item, result in zip(items, out, strict=True):
        cost = result.prompt_tokens + new_tokens
        shape = memory.add(shape, memory.item(item, cost=cost, keep=keep))
    return memory.bytes(shape)


def measure(vlm, engine, items, keep, new_tokens, repeats, bandwidth) -> dict:
    """Prefill (1 new token) and end-to-end (``new_tokens``) timings, min over repeats.

    On CUDA the first end-to-end call is an untimed warm-up (the selector's capture,
    allocator growth); a new decode shape's compile and capture happen in the engine's own
    warm-up inside it, reported as ``compile_s`` and never in a timing."""
    before, cuda = overhead.seconds(), vlm.device.type == "cuda"
    warm = run(vlm, items, keep, new_tokens, engine) if cuda else {"wall": 0.0}
    pre = [run(vlm, items, keep, 1, engine) for _ in range(repeats)]
    e2e = [run(vlm, items, keep, new_tokens, engine) for _ in range(repeats)]
    compile_s = overhead.seconds() - before
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
        "estimate_gib": max(r["estimate"] for r in e2e) / 2**30,
        "compile_s": compile_s,  # this row's new decode shapes (0 when already warm)
        "warmup_s": warm["wall"] - compile_s,  # the rest of the untimed first call
    }


def budget_batch(vlm, cost: int, args) -> tuple[int, int]:
    """(items the memory budget holds at this cost, items measured after the cap)."""
    if vlm.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(vlm.device)
        tokens = batch_token_budget(free, vlm.model.config.text_config, vlm.model.dtype)
    else:
        tokens = SMOKE_BATCH_TOKENS if args.smoke else DEFAULT_CPU_BATCH_TOKENS
    fits = max(1, tokens // cost)
    return fits, min(fits, args.max_batch)


def model_section(spec, args, device, dtype, bandwidth, clock) -> dict:
    """The model's rows (unpruned and pruned per batch), then its memory-budget rows."""
    name, family, text, vit, size, image_size, keep, plan, budget_keeps = spec
    if args.smoke:  # every kind of row, at tiny sizes
        text, vit, keep = TINY_TEXT, TINY_VIT, {"llava_next": 40}.get(family, 16)
        plan, budget_keeps = [(2, (None, "keep"))], (None, "keep")
        size, image_size = (336, 336) if family == "qwen2_5_vl" else (size, image_size)
    vlm, pre = build(family, text, vit, size, device, dtype, args.attn)
    engine = build_engine("transformers", vlm, cache=args.cache)  # one per model, as an actor
    pics = [
        Image.open(p).convert("RGB").resize((image_size, image_size))
        for p in sorted((ROOT / "pipeline/assets/images").glob("*.jpg"))
    ]
    distinct = [pre.prepare(pics[i % len(pics)], QUESTIONS[i % 4]) for i in range(8)]
    out: dict = {"rows": [], "attention": getattr(engine, "attention", None)}
    rows, repeats, last = out["rows"], 1 if args.smoke else 2, 0.0

    def cut() -> bool:  # not enough time left for one more compile and row
        if clock.left() >= last:
            return False
        out["cut"] = "budget"
        return True

    try:  # a failing row keeps the rows measured before it (and the section's error)
        for b, which in plan:
            items = [distinct[i % 8] for i in range(b)]
            for k in (keep if w == "keep" else None for w in which):
                if cut():
                    return finish(out, engine)
                t = time.perf_counter()
                rows.append(measure(vlm, engine, items, k, args.new_tokens, repeats, bandwidth))
                last = time.perf_counter() - t
                print(format_row(name, rows[-1]), flush=True)
    except Exception as err:
        out["error"] = f"{type(err).__name__}: {err}"[:500]
        return finish(out, engine)
    out["budget_items"] = budget = {}
    for k in (keep, None):  # the items the memory budget holds at each row's cost
        budget[k or "all"] = budget_batch(vlm, cost_tokens(vlm, distinct, k, rows, args), args)[0]
    for k in (keep if w == "keep" else None for w in budget_keeps):
        fits, b = budget_batch(vlm, cost_tokens(vlm, distinct, k, rows, args), args)
        if cut():
            return finish(out, engine)
        try:
            items = [distinct[i % 8] for i in range(b)]
            row = measure(vlm, engine, items, k, args.new_tokens, 1, bandwidth)
        except torch.cuda.OutOfMemoryError as err:
            row = {"batch": b, "keep": k or "all", "error": f"out of memory: {err}"[:200]}
        rows.append({**row, "memory_budget": True, "budget_items": fits})
        print(format_row(name, rows[-1]), flush=True)
    return finish(out, engine)


def finish(out: dict, engine) -> dict:
    """The section's compile and capture seconds per decode shape (batch x cache length)."""
    out["compile_s"] = {f"{b}x{n}": s for (b, n), s in getattr(engine, "warmups", {}).items()}
    return out


def cost_tokens(vlm, distinct: list, keep, rows: list[dict], args) -> int:
    """LLM tokens one item holds (prompt after pruning + new): a measured row's, else the
    prepared prompt's (pruned: minus the visual tokens a measured pruned row dropped)."""
    measured = [r["prompt_len"] for r in rows if r.get("keep") == (keep or "all")]
    if measured:
        return measured[0] + args.new_tokens
    prompt = max(len(it.input_ids) for it in distinct)
    if keep:
        image = vlm.model.config.image_token_id
        visual = max(int((it.input_ids == image).sum()) for it in distinct)
        kept = next((r["kept_tokens"] for r in rows if r.get("keep") == keep), keep)
        prompt -= visual - kept
    return prompt + args.new_tokens


def free_between_sections(device: torch.device) -> None:
    """Drop what the last section left: Python garbage, compiled graphs, cached blocks."""
    gc.collect()
    if device.type == "cuda":
        torch._dynamo.reset()  # compiled decode graphs and their CUDA-graph pools
        torch.cuda.empty_cache()


def emit(section: str, payload) -> None:
    """One JSON line for a finished section, flushed (a later crash loses nothing)."""
    print(json.dumps({"section": section, "result": payload}, default=str), flush=True)


def format_row(name: str, r: dict) -> str:
    if "error" in r:
        return f"{name:>9} b={r['batch']:<4} keep={r['keep']!s:<4} {r['error']}"
    tag = " (memory budget)" if r.get("memory_budget") else ""
    tag += f" | compile {r['compile_s']:.1f} s" if r.get("compile_s") else ""
    return (
        f"{name:>9} b={r['batch']:<4} keep={r['keep']!s:<4} tok={r['prompt_len']:<5}"
        f" vision {r['vision_ms']:8.1f} | select {r['select_ms']:7.1f} | prefill"
        f" {r['prefill_ms']:8.1f} ms | decode {r['decode_ms_step']:6.1f} (floor"
        f" {r['decode_floor_ms']:5.1f}) ms/step | e2e {r['e2e_s']:7.3f} s |"
        f" {r['items_per_s']:7.1f} items/s | peak {r['peak_gib']:6.1f} GiB"
        f" (estimate {r['estimate_gib']:6.1f}){tag}"
    )


def find(rows: list[dict], batch: int | None, pruned: bool, budget: bool = False) -> dict | None:
    """The measured row of one batch size (or the memory-budget row), pruned or unpruned."""
    for r in rows:
        if "error" in r or bool(r.get("memory_budget")) != budget:
            continue
        if (budget or r["batch"] == batch) and (r["keep"] != "all") == pruned:
            return r
    return None


def pair(rows: list[dict], batch: int) -> tuple[dict, dict] | None:
    """(unpruned, pruned) rows of one batch size, when both were measured."""
    a, b = find(rows, batch, False), find(rows, batch, True)
    return (a, b) if a and b else None


def targets(results: dict) -> list[dict]:
    """Issue 10's targets, each met, missed, or not measured (None)."""
    selector = results.get("selector")
    selector = selector if isinstance(selector, list) else []  # an error dict: not measured
    sel = {(r["batch"], r["n"], r["k"]): r["ms_per_call"] for r in selector}
    llava = results["models"].get("llava15", {}).get("rows", [])
    nxt = results["models"].get("next", {}).get("rows", [])
    out = [("selector ms/call [32,576,4096] k=64", sel.get((32, 576, 64)), "<=", 1.5)]
    for b in (8, 32):
        p = find(llava, b, True)
        share = p and p["select_ms"] / 1e3 / p["e2e_s"]
        out.append((f"llava15 b{b} selection share of e2e", share, "<=", 0.02))
        floor = p and p["decode_ms_step"] / p["decode_floor_ms"]
        out.append((f"llava15 b{b} decode / floor", floor, "<=", 1.5))
    p32, pn, pb = pair(llava, 32), pair(nxt, 8), find(llava, None, True, budget=True)
    out.append(("llava15 b32 e2e speedup", p32 and p32[0]["e2e_s"] / p32[1]["e2e_s"], ">=", 2.5))
    out.append(("next b8 e2e speedup", pn and pn[0]["e2e_s"] / pn[1]["e2e_s"], ">=", 3.0))
    out.append(("llava15 memory-budget items/s", pb and pb["items_per_s"], ">=", 150.0))
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
    p.add_argument(
        "--smoke",
        action="store_true",
        help="force the CPU at tiny sizes (seconds): checks that every section runs; tests "
        "none of the GPU behaviour (CUDA graphs, compiles, memory budget); for those run "
        "`python -m pytest -m gpu` on a GPU machine",
    )
    p.add_argument("--only", nargs="*", help="model sections to run: llava15 next qwen25vl")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=256, help="cap of the memory-budget batch")
    p.add_argument("--budget-s", type=float, default=330.0, help="stop starting sections after")
    p.add_argument(
        "--attn",
        default="sdpa",
        help="model.attn_implementation: sdpa (default), eager or flash_attention_2 (the "
        "compiled decode then runs the language model on sdpa; the vision tower keeps FA2)",
    )
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
        "models": {},
    }
    emit("setup", {k: v for k, v in results.items() if k != "models"})
    results["ceilings"] = section("ceilings", device, lambda: ceilings(device, args.smoke))
    results["selector"] = section("selector", device, lambda: selector(device, args.smoke, dtype))
    bandwidth = results["ceilings"].get("copy_tb_s", float("nan"))
    for spec in MODELS:
        name = spec[0]
        if args.only and name not in args.only:
            continue
        if clock.left() < 0:
            results["models"][name] = {"skipped": "budget"}
            emit(name, results["models"][name])
            continue
        results["models"][name] = section(
            name,
            device,
            lambda spec=spec: model_section(spec, args, device, dtype, bandwidth, clock),
        )
    results["targets"] = targets(results)
    for t in results["targets"]:
        t["met"] = None if args.smoke else t["met"]  # tiny sizes on a CPU say nothing
        verdict = {None: "not measured", True: "met", False: "MISSED"}[t["met"]]
        value = "-" if t["value"] is None else f"{t['value']:.3f}"
        print(f"target {t['target']:<40} {value:>9} (want {t['want']}): {verdict}")
    results["compile_s_total"] = overhead.seconds()
    results["overhead_s"] = overhead.by_label()  # decode shapes, selector captures, libraries
    results["dynamo_graphs"] = counters["stats"]["unique_graphs"]
    results["wall_s"] = time.perf_counter() - clock.start
    print(json.dumps(results, default=str), flush=True)


def section(name: str, device: torch.device, fn):
    """Run one section: its JSON line when it finishes, or its error (the next one runs)."""
    try:
        result = fn()
    except Exception as err:  # one section's failure must not lose the others
        result = {"error": f"{type(err).__name__}: {err}"[:500]}
    emit(name, result)
    free_between_sections(device)
    return result


if __name__ == "__main__":
    main()
