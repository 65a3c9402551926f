"""Faults injected against real components (in-process Ray, SeaweedFS S3, a tiny model), each
checked for "nothing lost, nothing doubled": every input id is committed exactly once.

Worker-side faults come from `tests.poison` (installed in every Ray worker); S3 faults from a
fault-injecting proxy (`tests.s3proxy`) in front of the S3 fixture; killed commits from a
subprocess that SIGKILLs itself at the commit's steps.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import ray
import yaml

from pipeline.__main__ import main as cli
from pipeline.io.storage import filesystem
from pipeline.job import runner
from pipeline.output import commit
from pipeline.output.columns import output_schema
from pipeline.spec import fingerprint, fingerprint_fields, parse_spec
from resprune.tiny import build_tiny_checkpoint
from tests.poison import CUDA_ERROR, KILL_ONCE, MARK
from tests.s3proxy import FaultProxy

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "pipeline" / "assets" / "images"
DATE = "2026-11-24"
FAULTS = Path(tempfile.mkdtemp(prefix="resprune-faults-"))

# One to two minutes each on 2 cores: the slow tier, which CI runs (`make test-slow`).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def ray_session(s3_server):
    """Ray with the fault hooks in every worker (started after S3: workers get AWS_*)."""
    env = {
        "worker_process_setup_hook": "tests.poison.install",
        "env_vars": {"PYTHONPATH": str(ROOT), "RESPRUNE_FAULTS": str(FAULTS)},
    }  # workers import `tests` too
    ray.shutdown()  # a session shared by earlier modules lacks the setup hook
    ray.init(
        num_cpus=4,
        num_gpus=1,
        include_dashboard=False,
        runtime_env=env,
        object_store_memory=300_000_000,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint("llava", tmp_path_factory.mktemp("model") / "llava")


def job(model: Path, inp: str, out: str, **execution) -> dict:
    return {
        "name": "faults",
        "input": {"uri": inp},
        "model": {"path": str(model), "max_new_tokens": 3},
        "execution": {
            "batch_size": 2,
            "max_task_retries": 2,
            "gpus_per_actor": 0,
            "preprocess_concurrency": 1,
        }
        | execution,
        "output": {"uri": out, "min_rows_per_file": 2},
        "cost": {"shadow_fraction": 0.0},
    }


def write_rows(uri: str, questions: list[str]) -> None:
    image = (ASSETS / "chelsea.jpg").read_bytes()
    rows = [{"id": f"r{i}", "image": image, "question": q} for i, q in enumerate(questions)]
    fs, root = filesystem(uri)
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(f"{root}/part.parquet") as f:
        pq.write_table(pa.Table.from_pylist(rows), f)


def results(uri: str) -> list[dict]:
    """Every visible result row (a plain dataset: no partition inference)."""
    fs, root = filesystem(uri)
    ds = pads.dataset(root, filesystem=fs, format="parquet", partitioning=None)
    if not ds.files:
        return []
    return ds.to_table(columns=["id", "status", "error_cause", "answer", "run_id"]).to_pylist()


def exactly_once(rows: list[dict], n: int) -> dict[str, dict]:
    by_id = {r["id"]: r for r in rows}
    assert sorted(r["id"] for r in rows) == sorted(f"r{i}" for i in range(n))  # no loss, no dup
    return by_id


@pytest.mark.timeout(600)
def test_poison_item_is_quarantined_and_its_batch_still_answered(
    tmp_path: Path, model: Path
) -> None:
    """r5 kills the model process on every attempt; r1 kills it once (a worker killed
    mid-batch). r5 is quarantined, everything else is answered, each id once."""
    questions = ["What is this?"] * 8
    questions[5] = f"{MARK}: what is this?"
    questions[1] = f"{KILL_ONCE}: what is this?"
    write_rows(str(tmp_path / "in"), questions)
    (FAULTS / "kill-once").write_text("")
    spec = parse_spec(
        job(model, str(tmp_path / "in"), str(tmp_path / "out"), batch_size=4, max_task_retries=3)
    )
    doc = runner.run_job(spec, DATE, progress=False)
    assert not (FAULTS / "kill-once").exists()  # the one-time kill happened
    status = {
        k: (r["status"], r["error_cause"])
        for k, r in exactly_once(results(str(tmp_path / "out")), 8).items()
    }
    assert status.pop("r5") == ("error", "crashed_worker")
    assert set(status.values()) == {("ok", None)}  # its batch-mates were answered one by one
    assert doc["status"] == "finished" and doc["errors_by_cause"] == {"crashed_worker": 1}


@pytest.mark.timeout(900)
def test_cuda_error_after_n_calls_fails_the_run_and_the_rerun_completes(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture
) -> None:
    """Every model process answers one batch, then raises a sticky CUDA error: each actor
    exits and is restarted until the bound, the run fails with one line, no error row is
    written, and the rerun (healthy GPU) answers the rest, each id once."""
    write_rows(str(tmp_path / "in"), ["What is this?"] * 4)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job(model, str(tmp_path / "in"), str(tmp_path / "out"))))
    (FAULTS / "cuda-after").write_text("1")
    try:
        assert cli(["run", str(path), "--no-progress", "--run-date", DATE]) == 1
    finally:
        (FAULTS / "cuda-after").unlink()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: run failed: SystemicFault") and CUDA_ERROR in err, err
    assert "hit it 3 time(s)" in err  # the first life and max_task_retries=2 restarts
    first = results(str(tmp_path / "out"))
    assert len(first) < 4 and {r["status"] for r in first} <= {"ok"}  # no error rows
    assert cli(["run", str(path), "--no-progress", "--run-date", DATE]) == 0
    rows = exactly_once(results(str(tmp_path / "out")), 4)
    assert {r["status"] for r in rows.values()} == {"ok"}
    assert "skipped" in capsys.readouterr().out


@pytest.mark.timeout(600)
def test_s3_throttling_and_resets_lose_and_double_nothing(
    tmp_path: Path, model: Path, s3_server, s3_bucket: str
) -> None:
    """All S3 traffic (shards, image URIs, commits, lease) goes through a proxy answering
    503 SlowDown or resetting the connection for a share of requests; one image fails on
    every attempt in the first run: its row is left uncommitted, and the rerun answers it."""
    client = s3_server.client()
    for i in range(8):
        client.put_object(
            Bucket=s3_bucket, Key=f"img/{i}.jpg", Body=(ASSETS / "chelsea.jpg").read_bytes()
        )
    table = pa.table(
        {
            "id": [f"r{i}" for i in range(8)],
            "uri": [f"s3://{s3_bucket}/img/{i}.jpg" for i in range(8)],
        }
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    client.put_object(
        Bucket=s3_bucket, Key=f"in/dt={DATE}/p.parquet", Body=sink.getvalue().to_pybytes()
    )
    out = f"s3://{s3_bucket}/captions/run_date={DATE}/"
    proxy = FaultProxy(s3_server.endpoint, slow_down=0.1, reset=0.05, seed=7).start()
    try:
        doc = job(model, f"s3://{s3_bucket}/in/dt={DATE}/", out)
        doc["input"] |= {"image_uri_column": "uri", "question_column": None}
        doc["storage"] = {"endpoint_url": proxy.endpoint}
        spec = parse_spec(doc)
        proxy.always_fail.append("img/3.jpg")
        first = runner.run_job(spec, DATE, progress=False)
        assert first["status"] == "failed" and "1 item(s) left unanswered" in first["failure"]
        assert sorted(r["id"] for r in results(out)) == [f"r{i}" for i in range(8) if i != 3]
        proxy.always_fail.clear()
        second = runner.run_job(spec, DATE, progress=False)
    finally:
        proxy.stop()
    assert second["status"] == "finished", second
    assert (second["items_skipped"], second["items_processed"]) == (7, 1)
    rows = exactly_once(results(out), 8)
    assert {r["status"] for r in rows.values()} == {"ok"}
    assert proxy.counts["slow_down"] > 10 and proxy.counts["reset"] > 5, proxy.counts


_KILLED_COMMIT = """
import json, os, signal, sys
import pyarrow as pa
from pipeline.output import commit
from pipeline.output.columns import output_schema
from pipeline.io.storage import filesystem
uri, step, ids, meta = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
fs, root = filesystem(uri)
rows = [{"id": i, "status": "ok", "answer": "from the killed run", "run_id": "killed"}
        for i in ids]
die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
if step == "after-marker":
    real = commit.write_json
    commit.write_json = lambda *a, **k: (real(*a, **k), die())
else:
    commit._check_lease = die
commit.commit_table(fs, root, pa.Table.from_pylist(rows, schema=output_schema()), "killed",
                    meta["fingerprint"], meta["fields"])
"""


@pytest.mark.timeout(600)
def test_killed_commits_and_a_late_orphan_write_then_resume(
    tmp_path: Path, model: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On S3 in the README layout: one writer killed right after its marker (r0, r1), one
    killed before it (r2, r3), and an orphaned writer that passed its lease check commits
    r4, r5 after the rerun planned. The rerun keeps r0, r1 as committed, redoes the rest, and
    every id ends up committed once, r4 and r5 in the rerun's own files."""
    inp, out = f"s3://{s3_bucket}/in/dt={DATE}/", f"s3://{s3_bucket}/captions/run_date={DATE}/"
    write_rows(inp, ["What is this?"] * 8)
    spec = parse_spec(job(model, inp, out))
    meta = json.dumps({"fingerprint": fingerprint(spec), "fields": fingerprint_fields(spec)})
    for step, ids in (("after-marker", ["r0", "r1"]), ("before-marker", ["r2", "r3"])):
        proc = subprocess.run(
            [sys.executable, "-c", _KILLED_COMMIT, out, step, json.dumps(ids), meta],
            cwd=ROOT,
            capture_output=True,
            timeout=60,
        )
        assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    fs, root = filesystem(out)
    planned = runner.make_plan

    def plan_then_orphan_commits(*args, **kwargs):
        plan = planned(*args, **kwargs)
        rows = [
            {"id": i, "status": "ok", "answer": "late", "run_id": "killed"} for i in ("r4", "r5")
        ]
        table = pa.Table.from_pylist(rows, schema=output_schema())
        commit._publish(
            fs, root, table, {"run_id": "killed", "spec_fingerprint": fingerprint(spec)}
        )
        return plan

    monkeypatch.setattr(runner, "make_plan", plan_then_orphan_commits)
    doc = runner.run_job(spec, DATE, progress=False)
    assert doc["status"] == "finished" and doc["files_recovered"] == 2
    assert (doc["items_skipped"], doc["items_processed"]) == (2, 6)
    rows = exactly_once(results(out), 8)
    assert [rows[i]["answer"] for i in ("r0", "r1")] == ["from the killed run"] * 2
    assert {rows[i]["run_id"] for i in ("r2", "r3", "r4", "r5")} == {doc["run_id"]}


@pytest.mark.timeout(900)
def test_an_engine_refusing_every_request_fails_the_run_and_writes_no_error_rows(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture
) -> None:
    """Every request refused (a plugin mismatch): never committed as the items' errors; the
    actor restarts within execution.max_task_retries, the run fails with one line, and the
    rerun (engine fixed) answers every id once."""
    write_rows(str(tmp_path / "in"), ["What is this?"] * 4)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job(model, str(tmp_path / "in"), str(tmp_path / "out"))))
    (FAULTS / "refuse").write_text("")
    try:
        assert cli(["run", str(path), "--no-progress", "--run-date", DATE]) == 1
    finally:
        (FAULTS / "refuse").unlink()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: run failed: SystemicFault: systemic fault, the model actor hit")
    assert "every item of a batch of 2 (model_error): vLLM refused the request" in err, err
    assert results(str(tmp_path / "out")) == []  # no error row, no answer
    assert cli(["run", str(path), "--no-progress", "--run-date", DATE]) == 0
    rows = exactly_once(results(str(tmp_path / "out")), 4)
    assert {r["status"] for r in rows.values()} == {"ok"}


@pytest.mark.timeout(600)
def test_a_host_memory_error_with_one_item_restarts_the_actor_not_an_error_row(
    tmp_path: Path, model: Path
) -> None:
    """A bare MemoryError while answering one item is out of memory, the job's sizing: the
    actor restarts and the item is answered (it used to be committed as model_error)."""
    write_rows(str(tmp_path / "in"), ["What is this?"] * 3)
    spec = parse_spec(job(model, str(tmp_path / "in"), str(tmp_path / "out"), batch_size=1))
    (FAULTS / "host-oom-once").write_text("")
    doc = runner.run_job(spec, DATE, progress=False)
    assert not (FAULTS / "host-oom-once").exists()  # the MemoryError was raised
    rows = exactly_once(results(str(tmp_path / "out")), 3)
    assert {r["status"] for r in rows.values()} == {"ok"}, rows
    assert doc["status"] == "finished" and doc["errors_by_cause"] == {}
