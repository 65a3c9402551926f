"""Benchmark: LLaVA-NeXT selection with newlines inside the budget vs one call outside it.

For a batch of LLaVA-NeXT items (tiny random-weight checkpoint: the token geometry of the
real model, base view + anyres tiles + newline rows, with a small hidden size) and each
pruner, times selection (pruner calls and budget bookkeeping) two ways in the same run:
  inside  - the shipped budget search: picks plus their rows' newlines fit ``keep``
  outside - one pruner call at ``keep`` with the newlines added on top (the previous rule)
and prints seconds, pruner calls, and kept tokens (what the LLM sees) per item, then a JSON
line. Run: python bench/budget.py [--keep 64 0.25] [--pruners resprune uniform random]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as `python bench/budget.py`, this folder heads sys.path, and bench/select.py would
# shadow the standard library's `select` module that torch imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from resprune import budget  # noqa: E402
from resprune.loading import load_preprocessor, load_vlm  # noqa: E402
from resprune.pruners import build_pruner  # noqa: E402
from resprune.tiny import build_tiny_checkpoint  # noqa: E402

SIZES = [(336, 336), (300, 451), (500, 260), (640, 480)]


def _outside(pruner, keep, images):
    """The previous rule: one call at keep over the selectable tokens, newlines on top."""
    targets = [min(budget.resolve_keep(keep, sum(len(c.index) for c in i.crops)),
                   sum(len(c.index) for c in i.crops)) for i in images]  # fmt: skip
    return budget._prune(pruner, images, targets)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", nargs="+", type=lambda v: float(v) if "." in v else int(v),
                    default=[64, 0.25])  # fmt: skip
    ap.add_argument("--pruners", nargs="+", default=["resprune", "uniform", "random", "pool"])
    args = ap.parse_args()
    path = build_tiny_checkpoint("llava_next", tempfile.mkdtemp())
    vlm, pre = load_vlm(str(path)), load_preprocessor(str(path))
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for h, w in SIZES]
    items = [pre.prepare(im, "What is on the table?") for im in pictures]
    results = []
    with torch.inference_mode():  # features once; selection timed per pruner and keep
        feats = vlm.adapter.encode(vlm.model, items)
        for method in args.pruners:
            for keep in args.keep:
                results.append(_measure(vlm, items, feats, method, keep))
    print("| pruner | keep | inside s | outside s | ratio | calls | kept inside | kept outside |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['pruner']} | {r['keep']} | {r['inside_s']:.3f} | {r['outside_s']:.3f} | "
              f"{r['inside_s'] / r['outside_s']:.1f}x | {r['calls']} | {r['kept_inside']} | "
              f"{r['kept_outside']} |")  # fmt: skip
    print(json.dumps(results))


def _measure(vlm, items, feats, method: str, keep) -> dict:
    pruner = build_pruner(method)
    calls = []
    prune = pruner.prune
    pruner.prune = lambda sets, ks: calls.append(len(sets)) or prune(sets, ks)
    pairs = list(zip(items, feats, strict=True))
    layouts = [vlm.adapter.layout(vlm.model, it, f.shape[0]) for it, f in pairs]
    images = [
        budget.ImageTokens(f, lay.crops, lay.newline_rows, key=str(i))
        for i, (f, lay) in enumerate(zip(feats, layouts, strict=True))
    ]
    _outside(pruner, keep, images)  # warm-up, discarded
    calls.clear()
    t0 = time.perf_counter()
    inside = budget.select_within_budget(pruner, keep, images)
    inside_s, n_calls = time.perf_counter() - t0, len(calls)
    t0 = time.perf_counter()
    outside = _outside(pruner, keep, images)
    outside_s = time.perf_counter() - t0
    return {"pruner": method, "keep": keep, "inside_s": inside_s, "outside_s": outside_s,
            "calls": n_calls, "kept_inside": _kept(inside, images),
            "kept_outside": _kept(outside, images)}  # fmt: skip


def _kept(picks, images) -> list[int]:
    """Tokens the LLM sees per image: picks plus the newlines of their rows."""
    out = []
    for p, image in zip(picks, images, strict=True):
        kept = budget.kept_index(p)
        out.append(len(kept) + len(budget.kept_rows(image, kept)))
    return out


if __name__ == "__main__":
    main()
