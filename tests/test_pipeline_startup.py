"""A run that cannot get its model actors says so, fails after startup_timeout_s with one line,
writes its summary and releases the lease (real in-process Ray with one logical GPU)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.__main__ import main as cli
from pipeline.io.storage import filesystem
from pipeline.job import watchdog
from pipeline.output import commit
from pipeline.spec import ExecutionSpec

ASSETS = Path(__file__).resolve().parent.parent / "pipeline" / "assets" / "images"

pytestmark = pytest.mark.usefixtures("ray_session")


def test_pending_line_names_what_is_missing() -> None:
    ex = ExecutionSpec(gpus_per_actor=1, cpus_per_actor=2, startup_timeout_s=600)
    line = watchdog.pending_line(ex, {"CPU": 3.0}, {"CPU": 4.0, "GPU": 1.0}, "h:1", 61)
    assert line == (
        "waiting for 1 model actor: 0 of 1 GPU free (needs 1 GPU, 2 CPU each; 3 of 4 CPU free) "
        "on the Ray cluster at h:1, 61 s so far (gives up after "
        "execution.startup_timeout_s=600)"
    )
    ex = ExecutionSpec(actors=(2, 4), gpus_per_actor=0, cpus_per_actor=1)
    line = watchdog.pending_line(ex, {"CPU": 4.0}, {"CPU": 4.0}, "h:1", 5)
    assert line.startswith("waiting for 2 model actors: the resources look free")


@pytest.mark.timeout(120)
def test_actors_that_never_fit_fail_the_run_after_the_startup_timeout(
    tiny_llava: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """The session has 1 GPU and the job asks 2 per actor: a waiting line every interval,
    then one failure line at startup_timeout_s, the summary written, the lease released."""
    monkeypatch.setattr(watchdog, "POLL_S", 0.5)
    monkeypatch.setattr(watchdog, "WAIT_LINE_S", 2.0)
    (tmp_path / "in").mkdir()
    image = (ASSETS / "chelsea.jpg").read_bytes()
    rows = [{"id": f"s{i}", "image": image, "question": "What?"} for i in range(2)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in" / "part.parquet")
    out = tmp_path / "out" / "run_date=2026-11-24"
    doc = {
        "name": "startup",
        "input": {"uri": str(tmp_path / "in")},
        "model": {"path": str(tiny_llava), "max_new_tokens": 2},
        "execution": {"gpus_per_actor": 2, "startup_timeout_s": 7},
        "output": {"uri": str(out)},
    }
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    started = time.monotonic()
    assert cli(["run", str(job), "--no-progress", "--run-date", "2026-11-24"]) == 1
    assert time.monotonic() - started < 40
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    waiting = [line for line in err if line.startswith("run: waiting for 1 model actor: ")]
    assert waiting, err  # one per WAIT_LINE_S (fewer on a loaded machine)
    assert "1 of 1 GPU free (needs 2 GPU, 1 CPU each" in waiting[0]
    assert err[-1].startswith(
        "error: run failed: StartupTimeout: no model actor started within "
        "execution.startup_timeout_s=7: waiting for 1 model actor: 1 of 1 GPU free"
    )
    runs = list((out / commit.RUNS).glob("*.json"))
    assert len(runs) == 1
    summary = json.loads(runs[0].read_text())
    assert summary["status"] == "failed" and summary["failure"].startswith("StartupTimeout: ")
    fs, root = filesystem(str(out))
    lease = json.loads((out / commit.MANIFEST / commit.LEASE).read_text())
    assert lease["run_id"] is None and lease["released_by"] == summary["run_id"]
    assert not commit.release_lease(fs, root, summary["run_id"])  # nothing left to release
