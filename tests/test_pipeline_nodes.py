"""A run on a multi-node cluster survives losing the model actor's node (a preempted spot GPU):
with a replacement it finishes every id once; without one it ends in one line after
``execution.startup_timeout_s`` and the rerun right after completes; a run that stops moving
names what blocks it and ends at ``execution.stall_timeout_s``.

Slow: `ray.cluster_utils.Cluster` starts real raylets on this machine (the head holds the
driver, the ledger and the CPU stages; a worker holds only a logical GPU, so the model actor
and nothing else runs there), with fast node health checks so a lost node is declared dead in
seconds. Worker-side slowness and hangs come from `tests.poison`.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import ray
import yaml
from ray.cluster_utils import Cluster

from pipeline.__main__ import main as cli
from pipeline.job import runner
from pipeline.output import commit
from pipeline.spec import parse_spec
from tests.test_pipeline_poison import DATE, FAULTS, ROOT, exactly_once, results, write_rows

pytestmark = pytest.mark.slow

HEALTH = {  # a node that stops answering is dead after about 3 s
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 1000,
    "health_check_failure_threshold": 3,
}


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    """No shared session here: each test starts its own cluster."""
    ray.shutdown()
    yield
    ray.shutdown()


@pytest.fixture
def cluster():
    """A head (3 CPU, no GPU; the driver joins it) and one GPU-only worker node."""
    head = {"num_cpus": 3, "num_gpus": 0, "include_dashboard": False, "_system_config": HEALTH}
    c = Cluster(initialize_head=True, head_node_args=head)
    c.add_node(num_cpus=0, num_gpus=1)
    _connect(c)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        (FAULTS / "slow").unlink(missing_ok=True)


def _connect(c: Cluster) -> None:
    """The driver joins the cluster (a new Ray job), with the fault hooks in its workers."""
    env = {
        "worker_process_setup_hook": "tests.poison.install",
        "env_vars": {"PYTHONPATH": str(ROOT), "RESPRUNE_FAULTS": str(FAULTS)},
    }
    ray.init(address=c.address, runtime_env=env)
    ray.data.DataContext.get_current().enable_progress_bars = False


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from resprune.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint("llava", tmp_path_factory.mktemp("model") / "llava")


def job(model: Path, tmp_path: Path, **execution) -> dict:
    return {
        "name": "nodes",
        "input": {"uri": str(tmp_path / "in")},
        "model": {"path": str(model), "max_new_tokens": 3},
        "execution": {
            "batch_size": 2,
            "gpus_per_actor": 1,
            "cpus_per_actor": 0,
            "preprocess_concurrency": 1,
        }
        | execution,
        "output": {"uri": str(tmp_path / "out"), "min_rows_per_file": 2},
        "cost": {"shadow_fraction": 0.0},
    }


def _after_a_commit(out: Path) -> None:
    """Wait until some rows are committed (the run is under way)."""
    deadline = time.monotonic() + 300
    while not list((out / commit.MANIFEST).glob("part-*.json")):
        assert time.monotonic() < deadline, "no commit within 300 s"
        time.sleep(0.2)


def _lose_gpu_node(cluster: Cluster) -> None:
    (gpu_node,) = cluster.worker_nodes
    cluster.remove_node(gpu_node, allow_graceful=False)  # as a preempted spot node


@pytest.mark.timeout(600)
def test_losing_the_model_actors_node_with_a_replacement_finishes_every_id_once(
    cluster: Cluster, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The run in a thread (Ray adds nodes from the main thread only): the GPU node is killed
    once rows are committed, a replacement joins 5 s later (an autoscaler's answer)."""
    write_rows(str(tmp_path / "in"), ["What is this?"] * 24)
    (FAULTS / "slow").write_text("0.5")  # a run long enough to lose the node in
    spec = parse_spec(job(model, tmp_path, startup_timeout_s=120))
    box: dict = {}

    def run() -> None:
        try:
            box["doc"] = runner.run_job(spec, DATE, progress=False)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    _after_a_commit(tmp_path / "out")
    _lose_gpu_node(cluster)
    time.sleep(5)
    cluster.add_node(num_cpus=0, num_gpus=1)
    thread.join(timeout=400)
    assert "doc" in box, box
    assert box["doc"]["status"] == "finished", box["doc"]
    rows = exactly_once(results(str(tmp_path / "out")), 24)
    assert {r["status"] for r in rows.values()} == {"ok"}  # no crashed_worker, no error
    err = capsys.readouterr().err
    lost = [line for line in err.splitlines() if line.startswith("run: lost node ")]
    assert len(lost) == 1 and "(node " in lost[0] and ", 1 GPU) mid-run; " in lost[0], err
    assert any(line.startswith("run: node ") and "joined" in line for line in err.splitlines())


@pytest.mark.timeout(600)
def test_no_replacement_ends_in_one_line_and_the_rerun_right_after_completes(
    cluster: Cluster, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    write_rows(str(tmp_path / "in"), ["What is this?"] * 24)
    (FAULTS / "slow").write_text("0.5")
    path = tmp_path / "job.yaml"
    # long enough for two worker processes to start on a loaded 2-core machine
    path.write_text(yaml.safe_dump(job(model, tmp_path, startup_timeout_s=90)))
    argv = ["run", str(path), "--no-progress", "--run-date", DATE]
    loss = threading.Thread(
        target=lambda: (_after_a_commit(tmp_path / "out"), _lose_gpu_node(cluster)), daemon=True
    )
    loss.start()
    started = time.monotonic()
    assert cli(argv) == 1
    assert time.monotonic() - started < 360
    captured = capsys.readouterr()
    line = captured.out.strip().splitlines()[-1]
    assert line.startswith(f"nodes {DATE} failed: ") and "(summary _runs/" in line, line
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("error: run failed: NodeLost: lost node "), last
    assert ", 1 GPU) and no capacity came back" in last
    assert "no capacity came back within execution.startup_timeout_s=90" in last
    assert "rerun the same command once the cluster has 1 GPU free" in last
    out = tmp_path / "out"
    (summary,) = [json.loads(p.read_text()) for p in (out / commit.RUNS).glob("*.json")]
    assert summary["status"] == "failed" and summary["failure"].startswith("NodeLost: ")
    lease = json.loads((out / commit.MANIFEST / commit.LEASE).read_text())
    assert lease["run_id"] is None and lease["released_by"] == summary["run_id"]
    first = results(str(out))
    assert 0 < len(first) < 24 and {r["status"] for r in first} == {"ok"}
    loss.join(timeout=5)
    # The rerun is a new process, as a user's: a new Ray job (the failed run's own actors,
    # still restarting in this test process's job, go with it), then the replacement node.
    ray.shutdown()
    _connect(cluster)
    cluster.add_node(num_cpus=0, num_gpus=1)
    (FAULTS / "slow").unlink()
    assert cli(argv) == 0
    rows = exactly_once(results(str(out)), 24)
    assert {r["status"] for r in rows.values()} == {"ok"}


@pytest.mark.timeout(600)
def test_a_stalled_run_names_what_blocks_it_and_ends_at_its_stall_timeout(
    cluster: Cluster, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The model call never returns (a hung batch): lines naming the batch in flight, then
    StallTimeout at execution.stall_timeout_s, the summary written, the lease released."""
    write_rows(str(tmp_path / "in"), ["What is this?"] * 4)
    (FAULTS / "slow").write_text("3600")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job(model, tmp_path, stall_timeout_s=45)))
    started = time.monotonic()
    assert cli(["run", str(path), "--no-progress", "--run-date", DATE]) == 1
    assert time.monotonic() - started < 300
    err = capsys.readouterr().err.strip().splitlines()
    stalled = [line for line in err if line.startswith("run: stalled: no model batch has ")]
    assert stalled, err
    held = "the model stage holds 2 item(s) in batches that have not returned"
    assert any(held in line for line in stalled), stalled  # once the hung batch began
    assert err[-1].startswith("error: run failed: StallTimeout: stalled: no model batch has ")
    assert held in err[-1] and err[-1].endswith("(execution.stall_timeout_s=45)")
    out = tmp_path / "out"
    (summary,) = [json.loads(p.read_text()) for p in (out / commit.RUNS).glob("*.json")]
    assert summary["status"] == "failed" and summary["failure"].startswith("StallTimeout: ")
    lease = json.loads((out / commit.MANIFEST / commit.LEASE).read_text())
    assert lease["run_id"] is None
