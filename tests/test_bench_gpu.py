"""bench/gpu.py --smoke runs end to end on the CPU, so the GPU script cannot rot.

The smoke run forces the CPU at tiny sizes: it checks that every section runs and reports,
and tests none of the GPU behaviour (CUDA graphs, compiled decode, the memory budget, GPU
kernels). Those are the `gpu` tier: `python -m pytest -m gpu` on a CUDA machine
(tests/test_gpu.py and the other tests marked `gpu`).
"""

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
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    result = lines[-1]
    # one JSON line per section, printed as it finished, before the final one
    sections = {x["section"]: x["result"] for x in lines[:-1]}
    assert list(sections) == ["setup", "ceilings", "selector", "llava15", "next", "qwen25vl"]
    assert sections["setup"]["attn"] == "sdpa" and sections["setup"]["smoke"] is True
    assert sections["llava15"] == result["models"]["llava15"]
    assert [r["k"] for r in result["selector"]] == [8, 24]
    assert all(r["capture_ms"] >= 0 for r in result["selector"])
    assert set(result["models"]) == {"llava15", "next", "qwen25vl"}
    for name, section in result["models"].items():
        assert "error" not in section, (name, section)
        assert section["compile_s"] == {}  # the CPU smoke compiles nothing
        rows = [r for r in section["rows"] if "error" not in r]
        unpruned, pruned = rows[0], rows[1]
        assert (unpruned["keep"], unpruned["kept_tokens"]) == ("all", unpruned["visual_tokens"])
        assert pruned["kept_tokens"] < pruned["visual_tokens"], name
        assert pruned["prompt_len"] < unpruned["prompt_len"], name
        assert all(r["e2e_s"] > 0 and r["select_ms"] >= 0 and r["compile_s"] >= 0 for r in rows)
        assert all(r["estimate_gib"] > 0 for r in rows)
        budget = section["budget_items"]  # the same memory holds several times more pruned items
        assert budget[str(pruned["keep"])] >= 3 * budget["all"], (name, budget)
        assert sum(1 for r in rows if r.get("memory_budget")) == 2
    # the CPU smoke compiles and captures nothing: its only overhead is the libraries' setup
    assert result["overhead_s"] and all(k.startswith("library setup") for k in result["overhead_s"])
    assert result["dynamo_graphs"] == 0
    assert len(result["targets"]) == 8 and all(t["met"] is None for t in result["targets"])
