"""Which cluster a run joins: a named address that does not answer is refused in one line
(exit 2, the summary written, the lease released) within seconds, so is one whose cluster
wants a token this process lacks, a stale address a
`ray start` left behind is passed over for a private cluster, and local paths are made
absolute on the driver before anything ships to workers. Also the summary line's note when
the error limit was not applied (too few items)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.__main__ import main as cli
from pipeline.job import connect
from pipeline.output import commit, summary
from pipeline.spec import anchor_local_paths, parse_spec
from tests.s3server import free_port

DATE = "2026-12-07"


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connect, "CONNECT_S", 1.0)
    monkeypatch.setattr(connect, "RETRY_S", 0.25)
    monkeypatch.setattr(connect, "TOKEN_CHECK_S", 0.5)


def test_a_named_address_that_does_not_answer_is_refused_quickly(quick) -> None:
    dead = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(connect.ClusterUnreachable, match=rf"RAY_ADDRESS={dead}: no Ray cluster"):
        connect.cluster_address(dead)
    with pytest.raises(connect.ClusterUnreachable, match="ray://"):
        connect.cluster_address(f"ray://{dead}")
    assert time.monotonic() - started < 5


def test_an_address_that_answers_is_joined_as_named(quick) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        live = f"127.0.0.1:{server.getsockname()[1]}"
        assert connect.cluster_address(live) == live
    assert connect.cluster_address("local") is None


def test_a_stale_cluster_file_starts_a_private_cluster_in_one_line(
    quick, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """`ray start` left its address in <RAY_TMPDIR>/ray/ray_current_cluster, then stopped."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    (tmp_path / "ray").mkdir()
    assert connect.cluster_address("") is None  # no file: a private cluster, nothing said
    assert capsys.readouterr().err == ""
    stale = f"127.0.0.1:{free_port()}"
    (tmp_path / "ray" / "ray_current_cluster").write_text(stale)
    assert connect.cluster_address("") is None
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"run: the Ray cluster at {stale} that `ray start` left on this machine does not answer "
        "(stopped since); starting a private local one (RAY_ADDRESS=local skips this check)"
    ]


def _one_row_job(tmp_path: Path, model: Path) -> None:
    """``tmp_path/job.yaml``: one input row in ``tmp_path/in``, output to ``tmp_path/out``."""
    (tmp_path / "in").mkdir()
    rows = [{"id": "a", "image": b"x", "question": "What?"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in" / "part.parquet")
    doc = {
        "name": "t",
        "input": {"uri": str(tmp_path / "in")},
        "model": {"path": str(model)},
        "output": {"uri": str(tmp_path / "out")},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))


def test_an_unreachable_cluster_ends_the_run_with_its_summary_and_no_lease(
    quick,
    tiny_llava: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    _one_row_job(tmp_path, tiny_llava)
    dead = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", dead)
    assert cli(["run", str(tmp_path / "job.yaml"), "--no-progress", "--run-date", DATE]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: RAY_ADDRESS={dead}: no Ray cluster"), err
    (doc,) = [json.loads(p.read_text()) for p in (tmp_path / "out" / commit.RUNS).glob("*.json")]
    assert doc["status"] == "failed" and doc["failure"].startswith("ClusterUnreachable: ")
    lease = json.loads((tmp_path / "out" / commit.MANIFEST / commit.LEASE).read_text())
    assert lease["run_id"] is None


def test_token_mode_without_a_token_is_refused_in_one_line_before_ray_aborts(
    tiny_llava: Path, tmp_path: Path
) -> None:
    """RAY_AUTH_MODE=token and no token anywhere (a new shell on another machine): Ray's
    core aborts the process with a C++ stack trace; the run says what to set, exit 2."""
    _one_row_job(tmp_path, tiny_llava)
    with socket.socket() as server:  # something answers at the address
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN")}
        env |= {"RAY_AUTH_MODE": "token", "HOME": str(tmp_path), "RAY_ADDRESS": address}
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline", "run", str(tmp_path / "job.yaml"), "--no-progress"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert err == [
        f"error: the Ray cluster at {address} requires token authentication: set "
        "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN to its token (or RAY_AUTH_TOKEN_PATH to a file "
        "holding it; `ray get-auth-token` on the head prints it) and run again"
    ]


def test_local_paths_are_made_absolute_on_the_driver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    spec = parse_spec(
        {
            "name": "t",
            "input": {"uri": "data/in", "image_root": "~/images"},
            "model": {"path": "./tiny/"},
            "output": {"uri": "out/{run_date}"},
        }
    )
    fixed = anchor_local_paths(spec)
    assert fixed.input.uri == str(tmp_path / "data" / "in")
    assert fixed.input.image_root == os.path.expanduser("~/images")
    assert fixed.model.path == str(tmp_path / "tiny")
    assert fixed.output.uri == str(tmp_path / "out" / "{run_date}")
    assert spec.input.uri == "data/in"  # a copy: the caller's spec is unchanged
    remote = parse_spec(
        {
            "name": "t",
            "input": {"uri": "s3://b/in"},
            "model": {"path": "llava-hf/llava-1.5-7b-hf"},
            "output": {"uri": "file:///abs/out"},
        }
    )
    same = anchor_local_paths(remote)
    assert (same.input.uri, same.model.path, same.output.uri) == (
        "s3://b/in",
        "llava-hf/llava-1.5-7b-hf",
        "file:///abs/out",
    )


def test_the_summary_line_says_when_the_error_limit_was_not_applied() -> None:
    doc = {
        "name": "n",
        "run_date": DATE,
        "status": "finished",
        "items_ok": 11,
        "items_error": 1,
        "items_skipped": 0,
        "items_total": 12,
        "wall_seconds": 3.0,
        "items_per_second": 4.0,
        "gpu_seconds": 1.0,
        "actor_seconds": 2.0,
        "output_uri": "out",
        "run_id": "r",
        "error_fraction": {"judged": False, "errors": 1, "items": 12, "min_items": 50},
    }
    line = summary.one_line(doc)
    assert line.endswith(
        "; error limit not applied: 1 error(s) in 12 item(s), fewer than "
        "execution.error_fraction_min_items=50"
    )
    doc["error_fraction"] |= {"judged": True}
    assert "error limit" not in summary.one_line(doc)
    doc["error_fraction"] |= {"judged": False, "errors": 0}
    assert "error limit" not in summary.one_line(doc)
