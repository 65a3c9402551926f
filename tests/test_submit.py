"""`pipeline submit`: runtime_env, entrypoint and CLI line; slow: a real `ray start --head`."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.__main__ import main as cli
from pipeline.cli.submit import (
    NoJobAgent,
    _submit,
    cli_line,
    entrypoint,
    runtime_env,
    submission_id,
)
from pipeline.spec import parse_spec
from tests.ray_cluster import start_cluster
from tests.s3server import SECRET_KEY

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "pipeline" / "assets" / "images"


def test_runtime_env_excludes_venv_and_outputs() -> None:
    spec = parse_spec(
        {
            "name": "n",
            "input": {"uri": "i"},
            "model": {"path": "m"},
            "output": {"uri": "o"},
            "runtime_env": {"excludes": ["data/"]},
        }
    )
    env = runtime_env(spec)
    assert env["working_dir"] == "." and {".venv", "demo-output", "data/"} <= set(env["excludes"])
    assert "env_vars" not in env


def test_entrypoint_and_cli_line() -> None:
    args = argparse.Namespace(spec="jobs/caption.yaml", overrides=["pruning.keep=32"])
    entry = entrypoint(args, "2026-11-24")
    assert entry == (
        "python -m pipeline run jobs/caption.yaml --run-date 2026-11-24 --set pruning.keep=32"
    )
    line = cli_line("http://h:8265", "caption-nightly-2026-11-24", entry)
    assert line.startswith("ray job submit --address http://h:8265 --working-dir . ")
    assert "--submission-id caption-nightly-2026-11-24" in line and line.endswith(f"-- {entry}")


class _Dashboard:
    """A dashboard answering as Ray's does before a node's job agent registers."""

    def __init__(self, refusals: int, error: str = "No available agent to submit job") -> None:
        self.refusals, self.error, self.submitted = refusals, error, []

    def submit_job(self, **kwargs) -> None:
        if self.refusals:
            self.refusals -= 1
            raise RuntimeError(f"Request failed with status code 500: {self.error}")
        self.submitted.append(kwargs["submission_id"])


def test_submit_waits_out_a_late_job_agent_and_names_a_missing_one(monkeypatch) -> None:
    monkeypatch.setattr("pipeline.cli.submit.time.sleep", lambda s: None)
    late = _Dashboard(refusals=3)
    _submit(late, wait_s=60, submission_id="a")
    assert late.submitted == ["a"] and late.refusals == 0
    with pytest.raises(NoJobAgent, match="--dashboard-agent-listen-port"):
        _submit(_Dashboard(refusals=10**6), wait_s=0, submission_id="b")
    other = _Dashboard(refusals=1, error="Job with submission_id c already exists")
    with pytest.raises(RuntimeError, match="already exists") as caught:
        _submit(other, wait_s=60, submission_id="c")
    assert not isinstance(caught.value, NoJobAgent)


# One token for every cluster of this module: Ray keeps the first token it saw per process.
TOKEN = secrets.token_hex(32)


@pytest.fixture
def ray_head(s3_server, monkeypatch: pytest.MonkeyPatch):
    """`ray start --head` on loopback with token auth and its own ports/temp dir."""
    yield from _head(monkeypatch, cpus=4)


@pytest.fixture
def two_cpu_head(monkeypatch: pytest.MonkeyPatch):
    """`ray start --head --num-cpus 2`, as a newcomer's laptop cluster (token auth)."""
    yield from _head(monkeypatch, cpus=2)


@pytest.fixture
def token_gcs(monkeypatch: pytest.MonkeyPatch):
    """A head with token auth and no dashboard: the GCS address a `run` joins."""
    yield from _head(monkeypatch, cpus=1, dashboard=False)


def _head(monkeypatch: pytest.MonkeyPatch, *, cpus: int, dashboard: bool = True):
    token_dir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    token_file = token_dir / "auth_token"
    token_file.write_text(TOKEN)
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    # the file too: a stale ~/.ray/auth_token on the machine must not decide which token is used
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    env = os.environ | {
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    cluster = start_cluster(cpus=cpus, env=env, dashboard=dashboard)
    try:
        yield cluster.dashboard_url if dashboard else cluster.gcs_address
    finally:
        cluster.kill()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_submit_to_a_real_cluster(ray_head: str, tmp_path: Path, capsys) -> None:
    from ray.job_submission import JobSubmissionClient

    from resprune.tiny import build_tiny_checkpoint

    model = build_tiny_checkpoint("llava", tmp_path / "model")
    (tmp_path / "in").mkdir()
    rows = [
        {"id": f"k{i}", "image": p.read_bytes(), "question": "What?"}
        for i, p in enumerate(sorted(ASSETS.glob("*.jpg")))
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in" / "part.parquet")
    doc = {
        "name": "submit-test",
        "input": {"uri": str(tmp_path / "in")},
        "model": {"path": str(model), "max_new_tokens": 4},
        "execution": {"batch_size": 2, "gpus_per_actor": 0},
        "output": {"uri": str(tmp_path / "out")},
    }
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    os.chdir(ROOT)
    argv = ["submit", str(job), "--address", ray_head, "--run-date", "2026-11-24"]
    assert cli(argv) == 0
    first = capsys.readouterr().out
    assert "submitted: submit-test-2026-11-24" in first and "ray job submit" in first
    out = pads.dataset(str(tmp_path / "out"), format="parquet").to_table()
    assert sorted(out.column("id").to_pylist()) == sorted(r["id"] for r in rows)
    assert cli([*argv, "--no-wait"]) == 0
    assert "already submitted" in capsys.readouterr().out
    jobs = JobSubmissionClient(ray_head).list_jobs()
    assert len([j for j in jobs if j.submission_id == "submit-test-2026-11-24"]) == 1
    listing = json.dumps([j.dict() for j in jobs], default=str)
    assert SECRET_KEY not in listing and os.environ["RAY_AUTH_TOKEN"] not in listing


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_run_joining_a_token_cluster_without_its_token_is_refused_in_one_line(
    token_gcs: str, tmp_path: Path
) -> None:
    """A new shell (no RAY_AUTH_* set, the token file only on the head's machine) joins a
    `ray start` cluster with token auth: one line saying what to set, exit 2, in seconds
    (Ray's own connect retries for 20 s, a warning a second, then a bare ConnectionError)."""
    import time

    job = tmp_path / "job.yaml"
    doc = {
        "name": "token",
        "input": {"uri": str(tmp_path / "in")},
        "model": {"path": "llava-hf/llava-1.5-7b-hf"},
        "output": {"uri": str(tmp_path / "out")},
    }
    job.write_text(yaml.safe_dump(doc))
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": ["a"], "image": [b"x"]}), tmp_path / "in" / "part.parquet")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env |= {"HOME": str(tmp_path), "RAY_ADDRESS": token_gcs}
    started = time.monotonic()
    proc = _pipeline("run", str(job), "--no-progress", env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert time.monotonic() - started < 60
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"error: the Ray cluster at {token_gcs} requires token authentication: set "
        "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN"
    ), proc.stderr
    assert "Traceback" not in proc.stderr and "ConnectionError" not in proc.stderr


def _pipeline(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipeline", *argv]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_spec_on_a_two_cpu_cluster_through_ray_job_submit(
    two_cpu_head: str, tmp_path: Path
) -> None:
    """The newcomer's path: the default demo spec on `ray start --num-cpus 2`; a night that
    failed (its relative paths are not uploaded) is retried under a new attempt id with the
    plain `ray job submit` CLI, and a third submit is refused as a duplicate."""
    from ray.job_submission import JobSubmissionClient

    from pipeline.cli.demo import _prepare

    data = tmp_path / "demo-output"
    _prepare(data, fresh=False)  # the demo's tiny model and input, outside the working dir
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    date, spec = "2026-11-24", "jobs/demo.yaml"
    # no token in a new shell: one line saying what to set
    bare = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH_TOKEN")}
    denied = _pipeline(
        "submit", spec, "--address", two_cpu_head, "--no-wait", env=bare | {"HOME": str(tmp_path)}
    )
    assert denied.returncode == 2, denied.stderr
    last = denied.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the Ray cluster at") and "RAY_AUTH_TOKEN" in last
    assert "Traceback" not in denied.stderr
    # an explicit layout that cannot fit, in a driver on the running cluster: the warning
    # names the cluster's own settings, never ray.init(num_cpus=...) (this first job also
    # waits out the fresh cluster's job agent, slow to start on a loaded machine)
    client = JobSubmissionClient(two_cpu_head)
    logs = _job_logs(client, PROBE)
    assert "may stall" in logs and "ray start --num-cpus" in logs
    assert "ray.init(num_cpus" not in logs
    # the spec as written: warned before submitting, then the job fails on the cluster
    first = _pipeline("submit", spec, "--address", two_cpu_head, "--run-date", date, env=env)
    assert first.returncode == 1
    assert "warning: input.uri 'demo-output/input/'" in first.stderr
    assert f"demo-{date}: FAILED" in first.stdout
    # the retry, through Ray's own CLI, under the next attempt id
    sid = submission_id(client, f"demo-{date}")[0]
    assert sid == f"demo-{date}-2"
    paths = {"input.uri": data / "input", "model.path": data / "model"}
    paths["output.uri"] = data / "results"
    sets = [f"--set={k}={v}" for k, v in paths.items()]
    excludes = json.dumps({"excludes": sorted(set(runtime_env_excludes()))})
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "job",
        "submit",
        "--address",
        two_cpu_head,
        "--working-dir",
        ".",
        "--submission-id",
        sid,
        "--runtime-env-json",
        excludes,
        "--",
        "python",
        "-m",
        "pipeline",
        "run",
        spec,
        "--run-date",
        date,
        "--no-progress",
        *sets,
    ]
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-2000:]
    assert f"demo {date} finished: 6 ok, 2 error, 0 skipped of 8" in second.stdout
    assert "ray.init(num_cpus" not in second.stdout + second.stderr
    out = pads.dataset(str(data / "results"), format="parquet").to_table()
    assert out.num_rows == 8
    third = _pipeline(
        "submit", spec, "--address", two_cpu_head, "--run-date", date, "--no-wait", *sets, env=env
    )
    assert third.returncode == 0
    assert f"already submitted: demo-{date}-2 is SUCCEEDED" in third.stdout
    ids = sorted(j.submission_id for j in client.list_jobs() if j.submission_id.startswith("demo"))
    assert ids == [f"demo-{date}", f"demo-{date}-2"]


PROBE = (
    "import ray; ray.init(); "
    "from pipeline.stages.processor import fit_to_cluster; "
    "from pipeline.spec import ProcessorConfig; "
    "fit_to_cluster(ProcessorConfig.model_validate("
    "{'model': {'path': 'm'}, 'execution': {'cpus_per_actor': 1}}))"
)


def _job_logs(client, code: str) -> str:
    """Run ``python -c code`` as a job on the cluster and return its logs once it ended."""
    import shlex
    import time

    from ray.job_submission import JobStatus

    from pipeline.cli.submit import EXCLUDES, _submit

    sid = f"probe-{secrets.token_hex(4)}"
    env = {"working_dir": ".", "excludes": EXCLUDES}
    entry = f"python -c {shlex.quote(code)}"
    _submit(client, wait_s=300, entrypoint=entry, submission_id=sid, runtime_env=env)
    deadline = time.monotonic() + 180
    while client.get_job_status(sid) not in {JobStatus.SUCCEEDED, JobStatus.FAILED}:
        assert time.monotonic() < deadline, "the probe job did not end"
        time.sleep(2)
    return client.get_job_logs(sid)


def runtime_env_excludes() -> list[str]:
    from pipeline.cli.submit import EXCLUDES

    return EXCLUDES
