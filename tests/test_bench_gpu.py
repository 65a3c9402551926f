"""bench/gpu.py --smoke runs end to end on the CPU, so the GPU script cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_smoke_runs_every_section():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["k"] for r in result["selector"]] == [8, 24]
    assert set(result["models"]) == {"llava15", "next", "qwen25vl"}
    for name, section in result["models"].items():
        rows = [r for r in section["rows"] if "error" not in r]
        unpruned, pruned = rows[0], rows[1]
        assert (unpruned["keep"], unpruned["kept_tokens"]) == ("all", unpruned["visual_tokens"])
        assert pruned["kept_tokens"] < pruned["visual_tokens"], name
        assert pruned["prompt_len"] < unpruned["prompt_len"], name
        assert all(r["e2e_s"] > 0 and r["select_ms"] >= 0 for r in rows)
        budget = section["budget_items"]  # the same memory holds several times more pruned items
        assert budget[str(pruned["keep"])] >= 3 * budget["all"], (name, budget)
        assert sum(1 for r in rows if r.get("memory_budget")) == 2
    assert len(result["targets"]) == 8 and all(t["met"] is None for t in result["targets"])
