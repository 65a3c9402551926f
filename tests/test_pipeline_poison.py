"""A poison item that kills the model process is quarantined; the rest of its batch is answered."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import ray

from pipeline import runner
from pipeline.spec import parse_spec
from resprune.tiny import build_tiny_checkpoint
from tests.poison import MARK

ASSETS = Path(__file__).resolve().parent.parent / "pipeline" / "assets" / "images"


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    env = {
        "worker_process_setup_hook": "tests.poison.install",
        "env_vars": {"PYTHONPATH": str(ASSETS.parents[2])},
    }  # workers import `tests` too
    ray.shutdown()  # a session shared by earlier modules lacks the setup hook
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, runtime_env=env,
             object_store_memory=300_000_000)  # fmt: skip
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.mark.timeout(300)
def test_poison_item_is_quarantined_and_its_batch_still_answered(tmp_path: Path) -> None:
    model = build_tiny_checkpoint("llava", tmp_path / "model")
    image = (ASSETS / "chelsea.jpg").read_bytes()
    questions = ["What is this?"] * 8
    questions[5] = f"{MARK}: what is this?"
    rows = [{"id": f"r{i}", "image": image, "question": q} for i, q in enumerate(questions)]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in" / "part.parquet")
    spec = parse_spec({
        "name": "poison", "input": {"uri": str(tmp_path / "in")},
        "model": {"path": str(model), "max_new_tokens": 3},
        "execution": {"batch_size": 4, "max_task_retries": 2},
        "output": {"uri": str(tmp_path / "out")}, "cost": {"shadow_fraction": 0.0},
    })  # fmt: skip
    doc = runner.run_job(spec, "2026-11-24", progress=False)
    out = pads.dataset(tmp_path / "out", format="parquet").to_table().to_pylist()
    status = {r["id"]: (r["status"], r["error_cause"]) for r in out}
    assert len(out) == len(status) == 8
    assert status.pop("r5") == ("error", "crashed_worker")
    assert set(status.values()) == {("ok", None)}  # its batch-mates were answered one by one
    assert doc["status"] == "finished" and doc["errors_by_cause"] == {"crashed_worker": 1}
