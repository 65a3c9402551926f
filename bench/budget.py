"""Benchmark: LLaVA-NeXT selection with newlines inside the budget vs one call outside it.

For a batch of LLaVA-NeXT items (tiny random-weight checkpoint: the token geometry of the
real model, base view + anyres tiles + newline rows, with a small hidden size) and each
pruner, times selection (pruner calls and budget bookkeeping) three ways in the same run:
  inside    - the shipped budget search: picks plus their rows' newlines fit ``keep``
              (one pruner call for prefix-consistent pruners: resprune, divprune)
  per round - the same search with one pruner call per round (the previous search; what
              the other pruners still do), checked to pick the same tokens
  outside   - one pruner call at ``keep`` with the newlines added on top (the older rule)
and prints seconds (least of --repeat runs), pruner calls, and kept tokens (what the LLM
sees) per item, then a JSON line. The three are interleaved run by run, so load on a shared
machine hits them alike. Run: python bench/budget.py [--keep 64 0.25] [--pruners ...]
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
    targets = [
        min(
            budget.resolve_keep(keep, sum(len(c.index) for c in i.crops)),
            sum(len(c.index) for c in i.crops),
        )
        for i in images
    ]
    return budget._prune(pruner, images, targets)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--keep", nargs="+", type=lambda v: float(v) if "." in v else int(v), default=[64, 0.25]
    )
    ap.add_argument(
        "--pruners", nargs="+", default=["resprune", "divprune", "uniform", "random", "pool"]
    )
    ap.add_argument("--repeat", type=int, default=5, help="timed runs; the least is kept")
    args = ap.parse_args()
    path = build_tiny_checkpoint("llava_next", tempfile.mkdtemp())
    vlm, pre = load_vlm(str(path)), load_preprocessor(str(path))
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for h, w in SIZES]
    items = [pre.prepare(im, "What is on the table?") for im in pictures]
    results = []
    with torch.inference_mode():  # features once; selection timed per pruner and keep
        feats = vlm.adapter.encode(vlm.model, items).features
        for method in args.pruners:
            for keep in args.keep:
                results.append(_measure(vlm, items, feats, method, keep, args.repeat))
    print(
        "| pruner | keep | inside s | calls | per-round s | calls | per-round / inside | "
        "same picks | outside s | inside / outside | kept inside | kept outside |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(
            f"| {r['pruner']} | {r['keep']} | {r['inside_s']:.3f} | {r['inside_calls']} | "
            f"{r['per_round_s']:.3f} | {r['per_round_calls']} | "
            f"{r['per_round_s'] / r['inside_s']:.1f}x | {r['same_picks']} | "
            f"{r['outside_s']:.3f} | {r['inside_s'] / r['outside_s']:.1f}x | "
            f"{r['kept_inside']} | {r['kept_outside']} |"
        )
    print(json.dumps(results))


def _measure(vlm, items, feats, method: str, keep, repeat: int) -> dict:
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
    runs = {
        "inside": lambda: budget.select_within_budget(pruner, keep, images),
        "per_round": lambda: budget.select_within_budget(_PerRound(pruner), keep, images),
        "outside": lambda: _outside(pruner, keep, images),
    }
    out = {"pruner": method, "keep": keep}
    picks = {}
    for name, (seconds, result, n_calls) in _timed(runs, calls, repeat).items():
        out[f"{name}_s"], picks[name], out[f"{name}_calls"] = seconds, result, n_calls
    out["same_picks"] = _same(picks["inside"], picks["per_round"])
    out["kept_inside"] = _kept(picks["inside"], images)
    out["kept_outside"] = _kept(picks["outside"], images)
    return out


def _timed(runs: dict, calls: list, repeat: int) -> dict:
    """Per run: least seconds over ``repeat`` interleaved rounds, its result and pruner calls."""
    best = {name: (float("inf"), None, 0) for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            calls.clear()
            t0 = time.perf_counter()
            result = run()
            seconds = time.perf_counter() - t0
            best[name] = (min(best[name][0], seconds), result, len(calls))
    return best


class _PerRound:
    """``pruner`` seen as not prefix-consistent: the budget search calls it every round."""

    prefix_consistent = False

    def __init__(self, pruner):
        self.name, self.prune = pruner.name, pruner.prune


def _same(picks, other) -> bool:
    """Whether two selections keep the same tokens of the same crops."""
    for a, b in zip(picks, other, strict=True):
        if [crop for crop, _, _ in a] != [crop for crop, _, _ in b]:
            return False
        if not all(torch.equal(x[2].indices, y[2].indices) for x, y in zip(a, b, strict=True)):
            return False
    return True


def _kept(picks, images) -> list[int]:
    """Tokens the LLM sees per image: picks plus the newlines of their rows."""
    out = []
    for p, image in zip(picks, images, strict=True):
        kept = budget.kept_index(p)
        out.append(len(kept) + len(budget.kept_rows(image, kept)))
    return out


if __name__ == "__main__":
    main()
