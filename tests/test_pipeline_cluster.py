"""The cluster `run` joined goes away mid-run: one line, the run summary, the lease released,
and the rerun (on a private local cluster, RAY_ADDRESS=local) finishes each id once. The job's
paths are relative to the driver's working directory, which the cluster's workers do not share.

Slow: a real `ray start --head` on loopback with its own ports and temp dir (stopped by pid,
never `ray stop`), and `python -m pipeline run` as a subprocess, as a user would run it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.output import commit
from resprune.tiny import build_tiny_checkpoint
from tests.ray_cluster import start_cluster

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "pipeline" / "assets" / "images"
DATE = "2026-11-24"
ENV = os.environ | {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
}

pytestmark = pytest.mark.slow


@pytest.fixture
def ray_head():
    cluster = start_cluster(cpus=4, env=ENV, dashboard=False)
    try:
        yield cluster
    finally:
        cluster.kill()


@pytest.mark.timeout(600)
def test_the_cluster_going_away_mid_run_ends_with_one_line_and_the_summary(
    ray_head, tmp_path: Path
) -> None:
    address = ray_head.gcs_address
    model = build_tiny_checkpoint("llava", tmp_path / "model")
    image = (ASSETS / "chelsea.jpg").read_bytes()
    rows = [{"id": f"c{i}", "image": image, "question": "What is this?"} for i in range(40)]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in" / "part.parquet")
    out = tmp_path / "out" / f"run_date={DATE}"
    doc = {  # relative paths: the driver resolves them, the workers run elsewhere
        "name": "gone",
        "input": {"uri": "in"},
        "model": {"path": f"./{model.name}", "max_new_tokens": 6},
        "execution": {"batch_size": 2, "gpus_per_actor": 0, "preprocess_concurrency": 1},
        "output": {"uri": str(out.relative_to(tmp_path)), "min_rows_per_file": 2},
        "cost": {"shadow_fraction": 0.0},
    }
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    argv = [sys.executable, "-m", "pipeline", "run", str(job), "--no-progress", "--run-date", DATE]
    run = subprocess.Popen(
        argv,
        cwd=tmp_path,
        env=ENV | {"RAY_ADDRESS": address},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not list((out / commit.MANIFEST).glob("part-*.json")):  # some rows committed
        assert run.poll() is None, run.communicate()
        assert time.monotonic() < deadline, "no commit within 300 s"
        time.sleep(0.5)
    ray_head.kill()
    gone = time.monotonic()
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == 1, (stdout, stderr)
    assert time.monotonic() - gone < 55  # before Ray's own 60 s end of the process
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: run failed: ClusterGone: the Ray cluster at ")
    assert f":{address.rsplit(':', 1)[1]} went away mid-run" in last  # the GCS's node address
    line = stdout.strip().splitlines()[-1]
    assert line.startswith(f"gone {DATE} failed: ") and "(summary _runs/" in line
    (summary,) = [json.loads(p.read_text()) for p in (out / commit.RUNS).glob("*.json")]
    assert summary["status"] == "failed" and summary["failure"].startswith("ClusterGone: ")
    assert 0 < summary["items_ok"] < len(rows)
    lease = json.loads((out / commit.MANIFEST / commit.LEASE).read_text())
    assert lease["run_id"] is None and lease["released_by"] == summary["run_id"]

    rerun = subprocess.run(
        argv, cwd=tmp_path, env=ENV | {"RAY_ADDRESS": "local"}, capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr
    ids = pads.dataset(str(out), format="parquet", partitioning=None).to_table(columns=["id"])
    assert sorted(ids.column("id").to_pylist()) == sorted(r["id"] for r in rows)
