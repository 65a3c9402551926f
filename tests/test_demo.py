"""The README's first command: `python -m pipeline demo` runs the whole job and the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_demo_runs_end_to_end_and_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    env = os.environ | {"RAY_ADDRESS": "local", "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, "-m", "pipeline", "demo", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = pads.dataset(out / "results", format="parquet").to_table().to_pylist()
    by_status = {r["id"]: r["status"] for r in rows}
    assert len(rows) == len(by_status) == 8
    assert by_status["bad-truncated"] == by_status["bad-thin"] == "error"
    assert sum(s == "ok" for s in by_status.values()) == 6
    report = json.loads((out / "results" / "_report" / "report.json").read_text())
    assert report["items_ok"] == 6 and report["items_error"] == 2 and report["shadow_items"] >= 1
    assert str(out / "results" / "_report" / "report.html") in proc.stdout
