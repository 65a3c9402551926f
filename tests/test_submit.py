"""`pipeline submit`: runtime_env, entrypoint and CLI line; slow: a real `ray start --head`."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
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
from pipeline.spec import parse_spec
from pipeline.submit import cli_line, entrypoint, runtime_env
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


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_cluster(temp_dir: str) -> None:
    """Stop only our cluster: processes whose command line names our temp dir, by pid."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if temp_dir.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(int(pid), signal.SIGKILL)
        except OSError:
            continue


@pytest.fixture
def ray_head(s3_server, monkeypatch: pytest.MonkeyPatch):
    """`ray start --head` on loopback with token auth and its own ports/temp dir."""
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    dash = _port()
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    token = secrets.token_hex(32)
    token_file = Path(temp_dir) / "auth_token"
    token_file.write_text(token)
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    # the file too: a stale ~/.ray/auth_token on the machine must not decide which token is used
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    env = os.environ | {
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        f"--port={_port()}",
        "--num-cpus=4",
        "--num-gpus=0",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=120)
    yield f"http://127.0.0.1:{dash}"
    _kill_cluster(temp_dir)


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
