"""Synthetic job outputs for the cost-report tests: result Parquet + `_runs/*.json`.

Written through fsspec so the same helper fills a temp folder or an S3 prefix. The rows
follow the output contract (DESIGN.md §3); values are small and chosen by the tests.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.report.load import filesystem

SHAPE = {
    "hidden_size": 64,
    "num_layers": 2,
    "intermediate_size": 128,
    "num_heads": 4,
    "num_kv_heads": 2,
    "vocab_size": 1000,
}


def rows(
    n: int,
    *,
    run_id: str = "r1",
    run_date: str = "2026-11-24",
    shadow: int = 0,
    seed: int = 0,
    errors: int = 0,
    **overrides: Any,
) -> dict[str, list]:
    """`n` ok rows (+ `errors` error rows); the first `shadow` ok rows are shadow items."""
    rng = np.random.default_rng(seed)
    gpu = rng.uniform(0.5, 1.5, n)
    data: dict[str, list] = {
        "id": [f"{run_date}-{run_id}-{i}" for i in range(n)],
        "question": [f"what is in image {i}?" for i in range(n)],
        "answer": [f"a cat number {i}" for i in range(n)],
        "status": ["ok"] * n,
        "error": [None] * n,
        "error_cause": [None] * n,
        "model": ["tiny-llava"] * n,
        "pruner": ["resprune"] * n,
        "keep": ["64"] * n,
        "visual_tokens": [576] * n,
        "kept_tokens": [64] * n,
        "kept_indices": [list(range(64))] * n,
        "retained_energy": rng.uniform(0.6, 0.95, n).tolist(),
        "prompt_tokens": [100] * n,
        "prompt_tokens_unpruned": [612] * n,
        "new_tokens": [20] * n,
        "gpu_seconds": gpu.tolist(),
        "preprocess_s": [0.1] * n,
        "vision_s": (gpu * 0.2).tolist(),
        "select_s": (gpu * 0.05).tolist(),
        "generate_s": (gpu * 0.75).tolist(),
        "shadow": [i < shadow for i in range(n)],
        "shadow_answer": [f"a cat number {i}" if i < shadow else None for i in range(n)],
        "shadow_gpu_seconds": [float(g * 2) if i < shadow else None for i, g in enumerate(gpu)],
        "shadow_new_tokens": [20 if i < shadow else None for i in range(n)],
        "run_id": [run_id] * n,
        "run_date": [run_date] * n,
    }
    data.update(overrides)
    for i in range(errors):
        for key, column in data.items():
            column.append(
                column[-1] if key not in ERROR_ROW else ERROR_ROW[key](i, run_id, run_date)
            )
    return data


ERROR_ROW = {
    "id": lambda i, r, d: f"{d}-{r}-err{i}",
    "status": lambda *_: "error",
    "error": lambda *_: "cannot decode",
    "error_cause": lambda i, *_: ["undecodable", "truncated"][i % 2],
    "answer": lambda *_: None,
    "gpu_seconds": lambda *_: 0.0,
    "shadow": lambda *_: False,
    "shadow_answer": lambda *_: None,
    "shadow_gpu_seconds": lambda *_: None,
}


def run_json(run_id: str = "r1", run_date: str = "2026-11-24", **overrides: Any) -> dict[str, Any]:
    """A `_runs/<run_id>.json` summary (price 2.5 USD on H100 unless overridden)."""
    summary = {
        "run_id": run_id,
        "name": "caption-nightly",
        "run_date": run_date,
        "started_at": f"{run_date}T01:00:00Z",
        "finished_at": f"{run_date}T02:00:00Z",
        "actor_seconds": 3600.0,
        "pruner": "resprune",
        "keep": "64",
        "alpha": 1.0,
        "model": "tiny-llava",
        "model_shape": SHAPE,
        "gpu_type": "H100",
        "usd_per_gpu_hour": 2.5,
        "shadow_fraction": 0.1,
        "status": "succeeded",
    }
    summary.update(overrides)
    return summary


def write_output(
    uri: str, data: dict[str, list], runs: list[dict[str, Any]], name: str = "part-00000.parquet"
) -> None:
    """Write one result file and the run summaries under `uri` (local folder or s3://)."""
    fs, root = filesystem(uri)
    fs.makedirs(root + "/_runs", exist_ok=True)
    fs.makedirs(root + "/_manifest", exist_ok=True)
    table = pa.table(data)
    with fs.open(f"{root}/{name}", "wb") as handle:
        pq.write_table(table, handle)
    for run in runs:
        with fs.open(f"{root}/_runs/{run['run_id']}.json", "wb") as handle:
            handle.write(json.dumps(run).encode())
    with fs.open(f"{root}/_manifest/{name}.done", "wb") as handle:
        handle.write(b"{}")
