"""The README's first command: `pipeline demo` runs the whole job and the report, resumes on a
second run, leaves `jobs/demo.yaml` runnable as is, keeps the console quiet, and ships in a
wheel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pyarrow.dataset as pads
import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = os.environ | {"RAY_ADDRESS": "local", "RAY_USAGE_STATS_ENABLED": "0"}
NOISE = ("raylet", "Running Dataset", "WARNING", "INFO", "Traceback", "it/s]")
# Ray core's false alarm for Ray Data's restartable actors (ray-project/ray#53727): filtered
RAY_DATA_OWN = "has constructor arguments in the object store"


def _pipeline(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipeline", *args]
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=280)


@pytest.mark.timeout(420)
def test_demo_runs_then_resumes_and_its_spec_runs_as_is(tmp_path: Path) -> None:
    first = _pipeline("demo", cwd=tmp_path)  # the default ./demo-output, as `make demo`
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = tmp_path / "demo-output" / "results"
    rows = pads.dataset(out, format="parquet").to_table().to_pylist()
    by_status = {r["id"]: r["status"] for r in rows}
    assert len(rows) == len(by_status) == 8
    assert by_status["bad-truncated"] == by_status["bad-thin"] == "error"
    report = json.loads((out / "_report" / "report.json").read_text())
    assert report["items_ok"] == 6 and report["items_error"] == 2 and report["shadow_items"] >= 1
    assert report["tiny_random_model"] is True
    lines = (first.stdout + first.stderr).splitlines()
    assert not [line for line in lines if any(n in line for n in NOISE)]
    assert not [line for line in lines if "core_worker.cc" in line or RAY_DATA_OWN in line]
    *_, result, last = first.stdout.strip().splitlines()
    assert result.startswith("demo ") and "finished: 6 ok, 2 error" in result  # summary line
    assert last.startswith("demo: the 2 error rows (bad_aspect 1, truncated 1) are the deliberate")

    again = _pipeline("demo", cwd=tmp_path)  # resumes: no model work, earlier summary kept
    assert again.returncode == 0, again.stderr[-3000:]
    *_, result, last = again.stdout.strip().splitlines()
    assert "0 ok, 0 error, 8 skipped of 8" in result and "nothing left to do" in last
    runs = [json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")]
    assert sorted(r["items_processed"] for r in runs) == [0, 8]

    spec = str(ROOT / "jobs" / "demo.yaml")  # the demo's own spec file, no overrides
    assert _pipeline("validate", spec, "--deep", cwd=tmp_path).returncode == 0
    rerun = _pipeline("run", spec, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "8 skipped of 8" in rerun.stdout


def test_wheel_ships_the_demo_spec(tmp_path: Path) -> None:
    src = tmp_path / "src"  # a copy: building in place would leave build/ in the checkout
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("pipeline", "resprune"):
        shutil.copytree(ROOT / package, src / package, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    dist = tmp_path / "dist"  # the PEP 517 hook itself: no pip or uv needed
    hook = "import sys; from setuptools import build_meta as b; b.build_wheel(sys.argv[1])"
    proc = subprocess.run(
        [sys.executable, "-c", hook, str(dist)],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    assert "pipeline/assets/demo.yaml" in names and "pipeline/assets/images/chelsea.jpg" in names
    site = str(tmp_path / "site")
    probe = (
        "import pipeline, pipeline.cli.demo as d; from pipeline.spec import load_spec; "
        f"assert pipeline.__file__.startswith({site!r}), pipeline.__file__; "
        "print(load_spec(d.JOB)[0].name)"
    )
    env = ENV | {"PYTHONPATH": site}  # the unpacked wheel first, dependencies from this venv
    run = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and run.stdout.strip() == "demo", run.stderr[-2000:]


def test_console_script_names_itself() -> None:
    script = Path(sys.executable).parent / "pipeline"
    if not script.exists():
        pytest.skip("the console script is not installed next to this interpreter")
    usage = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert usage.stdout.startswith("usage: pipeline ")
