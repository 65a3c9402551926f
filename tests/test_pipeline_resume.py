"""Resume after `kill -9` of the driver's process group: no loss, no duplicates, skips counted;
then a rerun of the finished night does no model work. On real S3, in the README's layout."""

from __future__ import annotations

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

from pipeline.io.storage import filesystem, list_files, read_json
from pipeline.output import commit, prefix
from resprune.tiny import build_tiny_checkpoint
from tests.s3server import SECRET_KEY

ASSETS = Path(__file__).resolve().parent.parent / "pipeline" / "assets" / "images"
ROWS, DATE = 48, "2026-11-24"


def write_job(tmp: Path, model: Path, bucket: str, client) -> Path:
    """The README's layout: input under a `dt=` partition, output `run_date={run_date}/`."""
    images = sorted(ASSETS.glob("*.jpg"))
    rows = [
        {
            "id": f"r{i:03d}",
            "image": images[i % len(images)].read_bytes(),
            "question": f"What is in picture {i}?",
        }
        for i in range(ROWS)
    ]
    for n in range(4):
        buf = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows[n * 12 : (n + 1) * 12]), buf)
        key = f"incoming/dt={DATE}/s{n}.parquet"
        client.put_object(Bucket=bucket, Key=key, Body=buf.getvalue().to_pybytes())
    doc = {
        "name": "resume",
        "input": {"uri": f"s3://{bucket}/incoming/dt={{run_date}}/"},
        "model": {"path": str(model), "max_new_tokens": 24},
        "execution": {"batch_size": 2, "gpus_per_actor": 0, "preprocess_batch_size": 2},
        "output": {"uri": f"s3://{bucket}/captions/run_date={{run_date}}/", "min_rows_per_file": 2},
        "cost": {"shadow_fraction": 0.0},
    }
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
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=root
        )


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


def result_ids(fs: pafs.FileSystem, out: str) -> list[str]:
    """Ids of every visible result file, read as a plain dataset (no partition inference)."""
    ds = pads.dataset(out, filesystem=fs, format="parquet", partitioning=None)
    return ds.to_table(columns=["id"]).column(0).to_pylist()


def latest_run(fs: pafs.FileSystem, out: str) -> dict:
    runs = [read_json(fs, p) for p in list_files(fs, f"{out}/_runs", ".json")]
    return max(runs, key=lambda r: r["started_at"] + r["run_id"])


def listing(fs: pafs.FileSystem, out: str) -> dict[str, int]:
    infos = fs.get_file_info(pafs.FileSelector(out, recursive=True))
    skip = ("/_runs/", "_lease.json")  # the rerun writes its summary and takes the lease
    return {
        i.path: i.size
        for i in infos
        if i.type == pafs.FileType.File and not any(s in i.path for s in skip)
    }


@pytest.mark.slow  # about a minute on 2 cores; CI runs the slow tier
@pytest.mark.timeout(420)
def test_sigkill_mid_run_then_resume_then_rerun_in_the_readme_layout(
    tmp_path: Path, s3_server, s3_bucket: str
) -> None:
    """On real S3 in `s3://bucket/captions/run_date=.../` (the layout that used to refuse
    resume: a hive partition was inferred from the path). The S3 fixture puts its secret
    sentinel in the environment: it must reach no log."""
    model = build_tiny_checkpoint(
        "llava", tmp_path / "model", text_hidden=256, text_layers=4, text_intermediate=512
    )
    job = write_job(tmp_path, model, s3_bucket, s3_server.client())
    log = tmp_path / "driver.log"
    ray_tmp = tempfile.mkdtemp(prefix="rr", dir="/tmp")
    fs, out = filesystem(f"s3://{s3_bucket}/captions/run_date={DATE}/")
    proc = start(job, ray_tmp, log)
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and proc.poll() is None:
        if len(prefix.scan(fs, out).markers) >= 3:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kill_leftovers(ray_tmp)
    before = settled_ids(fs, out)
    assert 0 < len(before) < ROWS, log.read_text()[-3000:]
    rerun = start(job, ray_tmp, log)
    assert rerun.wait(timeout=200) == 0, log.read_text()[-3000:]
    kill_leftovers(ray_tmp)
    assert sorted(result_ids(fs, out)) == [f"r{i:03d}" for i in range(ROWS)]  # exactly once
    run = latest_run(fs, out)
    # Orphaned Ray workers (renamed by setproctitle, so not found above) may still finish a
    # write after the kill: the rerun skips at least what was committed when we looked.
    assert run["items_skipped"] >= len(before) and run["items_processed"] > 0
    assert run["items_skipped"] + run["items_processed"] == ROWS
    assert run["status"] == "finished" and "skipped" in log.read_text().splitlines()[-1]
    files = listing(fs, out)
    again = start(job, ray_tmp, log)  # a rerun of the finished night: no model work
    assert again.wait(timeout=120) == 0, log.read_text()[-3000:]
    kill_leftovers(ray_tmp)
    run = latest_run(fs, out)
    assert (run["items_skipped"], run["items_processed"], run["actors"]) == (ROWS, 0, 0)
    assert listing(fs, out) == files  # results and markers untouched
    logs = [
        log,
        *Path(ray_tmp).rglob("*.log"),
        *Path(ray_tmp).rglob("*.out"),
        *Path(ray_tmp).rglob("*.err"),
    ]
    assert not [p for p in logs if p.is_file() and SECRET_KEY.encode() in p.read_bytes()]
