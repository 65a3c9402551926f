"""Pipeline benchmark: the same job, pruned (ResPrune keep 64) vs unpruned, on this machine.

Runs the real pipeline (local Ray, CPU model actor, bundled images) on an LLM-dominated
random LLaVA built by resprune.tiny, and reports:
  * items/s pruned / unpruned at 8, 16 and 64 new tokens (end to end and model-only);
  * the fraction of the model actor's held time spent inside the model;
  * peak RSS of the whole Ray session at 1x and 10x items (pruned);
  * items/s at the same memory budget (execution.max_batch_tokens), pruned vs unpruned.
Prints a table, then one JSON line. Usage: python bench/pipeline.py [--items 48] [--rss-items 16]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, bench/ is sys.path[0], where this file would shadow the `pipeline` package
# (and bench/select.py the stdlib `select`): import from the repository root instead.
ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT), *(p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench")]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

OUT = ROOT / "bench" / "out" / "pipeline"
ASSETS = ROOT / "pipeline" / "assets" / "images"
MODEL = {"text_hidden": 512, "text_layers": 6, "text_intermediate": 1376, "heads": 8, "kv_heads": 4}


def write_input(n: int) -> Path:
    """n rows cycling over the bundled images, in 4 shards."""
    folder = OUT / f"input-{n}"
    return write_rows(folder, n, shards=4, prefix="b", question="What is in this picture?")


def write_rows(folder: Path, n: int, *, shards: int, prefix: str, question: str | None) -> Path:
    """``n`` rows (ids ``{prefix}00000``, ...) cycling over the bundled images, split into
    ``shards`` Parquet files in ``folder``; an existing folder is reused as it is."""
    if folder.is_dir():
        return folder
    folder.mkdir(parents=True)
    images = sorted(ASSETS.glob("*.jpg"))
    rows = [
        {
            "id": f"{prefix}{i:05d}",
            "image": images[i % len(images)].read_bytes(),
            "question": question,
        }
        for i in range(n)
    ]
    step = -(-n // shards)
    for s in range(shards):
        part = pa.Table.from_pylist(rows[s * step : (s + 1) * step])
        pq.write_table(part, folder / f"s{s}.parquet")
    return folder


class RssSampler:
    """Peak summed RSS of every process in this session (driver, raylet, Ray workers)."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        sid = os.getsid(0)
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, sum(_rss(p) for p in _pids() if _sid(p) == sid))


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _sid(pid: int) -> int:
    try:
        return os.getsid(pid)
    except OSError:
        return -1


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run(
    model: Path,
    items: int,
    *,
    method: str,
    new_tokens: int,
    batch_size: int = 8,
    max_batch_tokens: int | None = None,
) -> dict:
    """One pipeline run into a fresh output folder; returns the run summary + peak RSS."""
    from pipeline.job import runner
    from pipeline.spec import parse_spec

    out = OUT / "results"
    shutil.rmtree(out, ignore_errors=True)
    spec = parse_spec(
        {
            "name": "bench",
            "input": {"uri": str(write_input(items))},
            "model": {"path": str(model), "family": "llava", "max_new_tokens": new_tokens},
            "pruning": {"method": method, "keep": 64 if method != "none" else 1.0},
            "execution": {
                "batch_size": batch_size,
                "max_batch_tokens": max_batch_tokens,
                "gpus_per_actor": 0,
                "cpus_per_actor": 2,
                "preprocess_batch_size": 4,
            },
            "output": {"uri": str(out), "min_rows_per_file": 64},
            "cost": {"shadow_fraction": 0.0, "gpu_type": "cpu"},
        }
    )
    with RssSampler() as rss:
        doc = runner.run_job(spec, "2026-11-24", progress=False)
    if doc["items_ok"] != items:
        raise RuntimeError(f"benchmark run lost items: {doc}")
    doc["peak_rss_mb"] = rss.peak / 2**20
    doc["model_items_per_s"] = items / max(doc["model_seconds"], 1e-9)
    return doc


def main() -> None:
    """Run every comparison, print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=48, help="items per comparison run")
    parser.add_argument("--rss-items", type=int, default=16, help="1x items of the RSS runs")
    args = parser.parse_args()
    t0 = time.time()
    import ray

    from resprune.tiny import build_tiny_checkpoint

    model = OUT / "model"
    if not (model / "config.json").is_file():
        build_tiny_checkpoint("llava", model, **MODEL)
    ray.init(num_cpus=4, num_gpus=0, include_dashboard=False, log_to_driver=False)
    run(model, 8, method="resprune", new_tokens=4)  # warm-up (imports, page cache), discarded
    n, rows, result = args.items, [], {"device": "CPU, 2 cores", "items": args.items}
    for tokens in (16, 8, 64):
        pr, un = (run(model, n, method=m, new_tokens=tokens) for m in ("resprune", "none"))
        ratio = pr["items_per_second"] / un["items_per_second"]
        model_ratio = pr["model_items_per_s"] / un["model_items_per_s"]
        rows.append((f"{tokens} new tokens", pr, un, ratio, model_ratio))
        result[f"ratio_{tokens}"], result[f"model_ratio_{tokens}"] = ratio, model_ratio
        result[f"model_fraction_{tokens}"] = pr["model_seconds"] / pr["actor_seconds"]
    budget = 2 * (596 + 16)  # two unpruned LLaVA-1.5 items per model batch
    pr, un = (
        run(model, n, method=m, new_tokens=16, batch_size=32, max_batch_tokens=budget)
        for m in ("resprune", "none")
    )
    ratios = (
        pr["items_per_second"] / un["items_per_second"],
        pr["model_items_per_s"] / un["model_items_per_s"],
    )
    rows.append((f"max_batch_tokens={budget}", pr, un, *ratios))
    result["budget_ratio"], result["budget_model_ratio"] = rows[-1][3], rows[-1][4]
    r = result["rss_items"] = args.rss_items
    one, ten = (run(model, k, method="resprune", new_tokens=8) for k in (r, 10 * r))
    result["rss_1x_mb"], result["rss_10x_mb"] = one["peak_rss_mb"], ten["peak_rss_mb"]
    result["rss_growth"] = ten["peak_rss_mb"] / one["peak_rss_mb"] - 1
    result["model_fraction_10x"] = ten["model_seconds"] / ten["actor_seconds"]
    result["seconds"] = time.time() - t0
    _print_table(rows, result)
    print(json.dumps(result, sort_keys=True))


def _print_table(rows: list, result: dict) -> None:
    print(
        f"{'setting':<24} {'pruned it/s':>11} {'unpruned it/s':>13} {'ratio':>6} "
        f"{'model ratio':>11} {'model frac':>10}"
    )
    for name, pr, un, ratio, model_ratio in rows:
        frac = pr["model_seconds"] / pr["actor_seconds"]
        print(
            f"{name:<24} {pr['items_per_second']:>11.3f} {un['items_per_second']:>13.3f} "
            f"{ratio:>6.2f} {model_ratio:>11.2f} {frac:>10.2f}"
        )
    print(
        f"peak RSS (pruned, 8 new tokens): {result['rss_1x_mb']:.0f} MB at {result['rss_items']} "
        f"items, {result['rss_10x_mb']:.0f} MB at {10 * result['rss_items']} "
        f"({100 * result['rss_growth']:+.1f}%)"
    )


if __name__ == "__main__":
    main()
