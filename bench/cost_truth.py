"""The cost report against a measured truth: the same items run three ways, interleaved.

  P: pruned, every model batch in the shadow sample (``shadow_fraction: 1.0``): the report's
     estimate of the GPU hours without pruning, and its pruned hours with a shadow beside them;
  U: unpruned (``pruning.method: none``): the measured GPU hours without pruning (the truth);
  Q: pruned without a shadow: the measured pruned hours.

Each round runs P, U and Q in a rotating order (so a slow spell of the machine does not land
on one way only), on the real pipeline (local Ray, one CPU model actor) with an LLM-dominated
random LLaVA-1.5 geometry from `resprune.tiny`. Hours are the reports' "GPU hours used" (model
time of the answered items plus failed attempts). Prints one line per run (with the machine's
1-minute load average: on a shared machine the runs' times move with it), the two ratios per
round, over all rounds (sums) and their per-round medians, then one JSON line.
Usage (a heavy run: one at a time on a shared machine):
  flock /tmp/ray-heavy.lock python bench/cost_truth.py [--items 32] [--rounds 3] [--batch-size 8]
      [--new-tokens 16]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, bench/ is sys.path[0], where bench/pipeline.py would shadow the `pipeline`
# package (and bench/select.py the stdlib `select`): import from the repository root instead.
ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT), *(p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench")]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

from bench.pipeline import MODEL, write_rows  # noqa: E402

OUT = ROOT / "bench" / "out" / "cost_truth"
WAYS = {  # name: (pruning method, keep, shadow fraction)
    "P": ("resprune", 64, 1.0),
    "U": ("none", 1.0, 0.0),
    "Q": ("resprune", 64, 0.0),
}


def run(way: str, model: Path, inputs: Path, args: argparse.Namespace) -> dict:
    """One run of ``way`` into a fresh output folder; returns its report's numbers."""
    from pipeline.job import runner
    from pipeline.report.api import build_report
    from pipeline.report.load import load_output
    from pipeline.spec import parse_spec

    method, keep, fraction = WAYS[way]
    out = OUT / f"results-{way}"
    shutil.rmtree(out, ignore_errors=True)
    spec = parse_spec(
        {
            "name": f"cost-truth-{way.lower()}",
            "input": {"uri": str(inputs)},
            "model": {"path": str(model), "family": "llava", "max_new_tokens": args.new_tokens},
            "pruning": {"method": method, "keep": keep},
            "execution": {
                "batch_size": args.batch_size,
                "gpus_per_actor": 0,
                "cpus_per_actor": 2,
                "preprocess_batch_size": args.batch_size,
            },
            "output": {"uri": str(out), "min_rows_per_file": 64},
            "cost": {"shadow_fraction": fraction, "gpu_type": "cpu"},
        }
    )
    load = os.getloadavg()[0]
    doc = runner.run_job(spec, "2026-12-07", progress=False)
    if doc["items_ok"] != args.items:
        raise RuntimeError(f"run {way} lost items: {doc['items_ok']} of {args.items} ok")
    report = build_report(load_output(str(out)))
    return {
        "used_h": report["gpu_hours_used"],
        "unpruned_est_h": report["gpu_hours_unpruned_est"],
        "unpruned_ci_h": report["gpu_hours_unpruned_ci"],
        "shadow_batches": report["shadow_batches"],
        "time_ratio": report["time_ratio"],
        "model_s": doc["model_seconds"],
        "load": (load + os.getloadavg()[0]) / 2,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def main() -> None:
    """Run the rounds, print one line per run and the ratios, then the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    import ray

    from resprune.tiny import build_tiny_checkpoint

    t0 = time.time()
    model = OUT / "model"
    if not (model / "config.json").is_file():
        build_tiny_checkpoint("llava", model, **MODEL)
    inputs = write_rows(
        OUT / f"input-{args.items}", args.items, shards=2, prefix="c", question=None
    )
    ray.init(num_cpus=4, num_gpus=0, include_dashboard=False, log_to_driver=False)
    run("Q", model, inputs, args)  # warm-up (imports, page cache), discarded
    rounds = []
    for r in range(args.rounds):
        order = "PUQ"[r % 3 :] + "PUQ"[: r % 3]
        got = {way: run(way, model, inputs, args) for way in order}
        est = _ratio(got["P"]["unpruned_est_h"], got["U"]["used_h"])
        pq_ratio = _ratio(got["P"]["used_h"], got["Q"]["used_h"])
        rounds.append({"order": order, **got, "est_over_truth": est, "pruned_p_over_q": pq_ratio})
        for way in order:
            g = got[way]
            print(
                f"round {r} {way}: used {3600 * g['used_h']:.2f} s, unpruned est "
                f"{3600 * (g['unpruned_est_h'] or 0):.2f} s, shadow batches "
                f"{g['shadow_batches']}, load {g['load']:.1f}"
            )
        print(f"round {r} ({order}): estimate / U = {est:.3f}, P pruned / Q = {pq_ratio:.3f}")
    total = {w: sum(x[w]["used_h"] for x in rounds) for w in WAYS}
    est_total = sum(x["P"]["unpruned_est_h"] for x in rounds)
    result = {
        "device": "CPU, 2 cores",
        "items": args.items,
        "batch_size": args.batch_size,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "estimate_over_truth": est_total / total["U"],
        "pruned_with_shadow_over_without": total["P"] / total["Q"],
        "per_round_estimate_over_truth": [x["est_over_truth"] for x in rounds],
        "per_round_pruned_with_over_without": [x["pruned_p_over_q"] for x in rounds],
        "median_estimate_over_truth": statistics.median(x["est_over_truth"] for x in rounds),
        "median_pruned_with_over_without": statistics.median(x["pruned_p_over_q"] for x in rounds),
        "truth_ratio_u_over_q": total["U"] / total["Q"],
        "load": [[round(x[w]["load"], 1) for w in x["order"]] for x in rounds],
        "report_time_ratio": [x["P"]["time_ratio"] for x in rounds],
        "seconds": time.time() - t0,
    }
    print(
        f"all rounds: estimate / U = {result['estimate_over_truth']:.3f}, "
        f"P pruned / Q = {result['pruned_with_shadow_over_without']:.3f}, "
        f"U / Q = {result['truth_ratio_u_over_q']:.2f}; per-round medians: "
        f"{result['median_estimate_over_truth']:.3f}, "
        f"{result['median_pruned_with_over_without']:.3f}"
    )
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
