"""Resume after `kill -9` of the driver's process group: no loss, no duplicates, skips counted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import commit
from resprune.tiny import build_tiny_checkpoint
from tests.s3server import SECRET_KEY

ASSETS = Path(__file__).resolve().parent.parent / "pipeline" / "assets" / "images"
ROWS, DATE = 48, "2026-11-24"


def write_job(tmp: Path, model: Path) -> Path:
    images = sorted(ASSETS.glob("*.jpg"))
    rows = [{"id": f"r{i:03d}", "image": images[i % len(images)].read_bytes(),
             "question": f"What is in picture {i}?"} for i in range(ROWS)]  # fmt: skip
    (tmp / "in").mkdir()
    for n in range(4):
        pq.write_table(
            pa.Table.from_pylist(rows[n * 12 : (n + 1) * 12]), tmp / "in" / f"s{n}.parquet"
        )
    doc = {
        "name": "resume", "input": {"uri": str(tmp / "in")},
        "model": {"path": str(model), "max_new_tokens": 24},
        "execution": {"batch_size": 2, "gpus_per_actor": 0, "preprocess_batch_size": 2},
        "output": {"uri": str(tmp / "out"), "min_rows_per_file": 2},
        "cost": {"shadow_fraction": 0.0},
    }  # fmt: skip
    (tmp / "job.yaml").write_text(yaml.safe_dump(doc))
    return tmp / "job.yaml"


def start(job: Path, ray_tmp: str, log: Path) -> subprocess.Popen:
    env = os.environ | {
        "RAY_ADDRESS": "local",
        "RAY_TMPDIR": ray_tmp,
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    cmd = [sys.executable, "-m", "pipeline", "run", str(job), "--run-date", DATE, "--no-progress"]
    root = Path(__file__).parent.parent
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, cwd=root)  # fmt: skip


def kill_leftovers(ray_tmp: str) -> None:
    """Ray helpers that outlive the killed group are found by our unique temp dir, by pid."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if ray_tmp.encode() in cmdline:
                os.kill(int(pid), signal.SIGKILL)
        except OSError:
            continue


def settled_ids(fs: pafs.FileSystem, out: str) -> set[str]:
    """Committed ids once no write has landed for 2 s (in-flight writers may still finish)."""
    seen, quiet_since = None, time.monotonic()
    deadline = quiet_since + 30
    while time.monotonic() < deadline:
        commit.recover(fs, out)
        ids = commit.committed_ids(fs, out)
        if ids != seen:
            seen, quiet_since = ids, time.monotonic()
        elif time.monotonic() - quiet_since >= 2:
            break
        time.sleep(0.25)
    return seen


@pytest.mark.timeout(300)
def test_sigkill_mid_run_then_resume(tmp_path: Path, s3_server) -> None:
    """The S3 fixture puts its secret sentinel in the environment: it must reach no log."""
    model = build_tiny_checkpoint("llava", tmp_path / "model", text_hidden=256, text_layers=4,
                                  text_intermediate=512)  # fmt: skip
    job, log = write_job(tmp_path, model), tmp_path / "driver.log"
    ray_tmp = tempfile.mkdtemp(prefix="rr", dir="/tmp")
    out, fs = str(tmp_path / "out"), pafs.LocalFileSystem()
    proc = start(job, ray_tmp, log)
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and proc.poll() is None:
        if len(commit._markers(fs, out)) >= 3:
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kill_leftovers(ray_tmp)
    before = settled_ids(fs, out)
    assert 0 < len(before) < ROWS, log.read_text()[-3000:]
    rerun = start(job, ray_tmp, log)
    assert rerun.wait(timeout=200) == 0, log.read_text()[-3000:]
    kill_leftovers(ray_tmp)
    ids = pads.dataset(out, format="parquet").to_table(columns=["id"]).column(0).to_pylist()
    assert sorted(ids) == [f"r{i:03d}" for i in range(ROWS)]  # every id exactly once
    (run,) = [json.loads(p.read_text()) for p in (tmp_path / "out" / "_runs").glob("*.json")]
    # Orphaned Ray workers (renamed by setproctitle, so not found above) may still finish a
    # write after the kill: the rerun skips at least what was committed when we looked.
    assert run["items_skipped"] >= len(before) and run["items_processed"] > 0
    assert run["items_skipped"] + run["items_processed"] == ROWS
    assert run["status"] == "finished" and "skipped" in log.read_text().splitlines()[-1]
    logs = [
        log,
        *Path(ray_tmp).rglob("*.log"),
        *Path(ray_tmp).rglob("*.out"),
        *Path(ray_tmp).rglob("*.err"),
    ]
    assert not [p for p in logs if p.is_file() and SECRET_KEY.encode() in p.read_bytes()]
