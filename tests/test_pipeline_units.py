"""Driver-side pieces without Ray: commit/recovery, planning, packing, shadow, redaction."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline.io.storage import StorageError, filesystem, redact
from pipeline.job.plan import make_plan
from pipeline.output import commit
from pipeline.output.columns import output_schema
from pipeline.output.summary import held_seconds
from pipeline.spec import fingerprint, parse_spec
from pipeline.stages.answer import pack
from pipeline.stages.shadow import PRUNED_FIRST, TWIN_FIRST, ShadowSample, size_bucket

FS = pafs.LocalFileSystem()


def rows(ids: list[str]) -> pa.Table:
    data = [{"id": i, "status": "ok", "gpu_seconds": 0.5, "new_tokens": 3} for i in ids]
    return pa.Table.from_pylist(data, schema=output_schema())


def test_commit_then_recover_is_idempotent(tmp_path: Path) -> None:
    root = str(tmp_path)
    stats = commit.commit_table(FS, root, rows(["b", "a"]), "run-1")
    assert stats["file"] == commit.file_name(["a", "b"]) and stats["items_ok"] == 2
    assert commit.recover(FS, root) == 0
    assert commit.committed_ids(FS, root) == {"a", "b"}
    assert commit.commit_table(FS, root, rows(["a", "b"]), "run-2")["file"] == stats["file"]
    assert len(commit.committed_files(FS, root)) == 1


def test_recover_rolls_forward_and_drops_uncommitted(tmp_path: Path) -> None:
    root = str(tmp_path)
    name = commit.commit_table(FS, root, rows(["x"]), "r")["file"]
    FS.move(f"{root}/{name}", f"{root}/_staging/{name}")  # killed after the marker, before the move
    pq.write_table(rows(["y"]), f"{root}/_staging/part-orphan.parquet")  # killed before the marker
    assert commit.recover(FS, root) == 2
    assert os.listdir(f"{root}/_staging") == []
    assert commit.committed_ids(FS, root) == {"x"}


def test_a_superseded_writer_commits_nothing(tmp_path: Path) -> None:
    root = str(tmp_path)
    commit.take_lease(FS, root, "run-old")
    commit.commit_table(FS, root, rows(["a"]), "run-old")
    commit.take_lease(FS, root, "run-new")  # a rerun after a crash takes the prefix
    with pytest.raises(commit.SupersededError, match=r"superseded .* by run run-new"):
        commit.commit_table(FS, root, rows(["b"]), "run-old")  # an orphaned writer
    assert os.listdir(f"{root}/_staging") == []
    assert commit.committed_ids(FS, root) == {"a"}
    commit.commit_table(FS, root, rows(["b"]), "run-new")
    assert commit.committed_ids(FS, root) == {"a", "b"}


def test_recover_drops_a_marker_whose_file_vanished(tmp_path: Path) -> None:
    root = str(tmp_path)
    name = commit.commit_table(FS, root, rows(["x", "y"]), "r")["file"]
    os.remove(f"{root}/{name}")  # its staging file was cleaned before the writer's move
    assert commit.recover(FS, root) == 1
    assert commit.committed_files(FS, root) == [] and commit.committed_ids(FS, root) == set()


def test_unmarked_results_are_refused(tmp_path: Path) -> None:
    pq.write_table(rows(["z"]), tmp_path / "foreign.parquet")
    with pytest.raises(StorageError, match="without commit markers"):
        commit.recover(FS, str(tmp_path))


def test_pack_respects_budget_and_cap() -> None:
    assert pack([10, 10, 10, 10], budget=25, max_items=10) == [[0, 1], [2, 3]]
    assert pack([5] * 5, budget=None, max_items=2) == [[0, 1], [2, 3], [4]]
    assert pack([100, 1], budget=50, max_items=4) == [[0], [1]]  # oversize items go alone


def test_shadow_sample_is_systematic_per_bucket_and_alternates_the_pass_order() -> None:
    sample = ShadowSample(0.25)  # every 4th batch of a bucket, its first one included
    sizes = [8] * 9 + [3] * 5
    drawn = [k for k, n in enumerate(sizes) if sample.draw(n)]
    assert drawn == [0, 4, 8, 9, 13]  # bucket 8-15: batches 0, 4, 8; bucket 2-3: its 1st, 5th
    orders = ShadowSample(1.0)
    assert [orders.draw(8) for _ in range(4)] == [PRUNED_FIRST, TWIN_FIRST] * 2
    replay = ShadowSample(0.25)  # deterministic: the same batches give the same draws
    assert [k for k, n in enumerate(sizes) if replay.draw(n)] == drawn
    assert not any(ShadowSample(0.0).draw(8) for _ in range(10))


def test_a_dead_actor_process_is_billed_until_its_last_report() -> None:
    """Ray restarted actor "x" (its second process reports the same actor id): the first
    process is billed from its start to its last report, the others to the run's end."""
    actors = {
        "k1": {"started": 100.0, "last": 160.0, "actor_id": "x"},  # died after 160
        "k2": {"started": 190.0, "last": 250.0, "actor_id": "x"},  # its restart, alive
        "k3": {"started": 100.0, "last": 120.0, "actor_id": "y"},  # idle, alive
        "k4": {"started": 110.0, "shape": None},  # an older actor report: no id
    }
    assert held_seconds(actors, finished=300.0) == pytest.approx(60 + 110 + 200 + 190)
    died_before_reporting = {
        "a": {"started": 0.0, "actor_id": "z"},
        "b": {"started": 50.0, "actor_id": "z"},
    }
    assert held_seconds(died_before_reporting, finished=100.0) == pytest.approx(0 + 50)


@pytest.mark.parametrize("fraction", [0.5, 0.01])
def test_a_small_night_is_always_measured(fraction: float) -> None:
    """Four batches and a fraction above zero: at least one twin (the first batch)."""
    sample = ShadowSample(fraction)
    assert sum(sample.draw(8) is not None for _ in range(4)) == (2 if fraction == 0.5 else 1)
    assert [size_bucket(n) for n in (1, 2, 3, 4, 7, 8, 15, 16)] == [1, 2, 2, 4, 4, 8, 8, 16]


def test_redact_and_uri_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    assert "s3cr3t" not in redact("denied for s3cr3t-value at s3://AK:s3cr3t-value@b/k")
    with pytest.raises(StorageError, match="credentials in URIs"):
        filesystem("s3://AK:pw@bucket/x")


def _spec(tmp_path: Path, **inp) -> object:
    inp = {"uri": str(tmp_path / "in")} | inp
    return parse_spec(
        {
            "name": "t",
            "input": inp,
            "model": {"path": "org/m"},
            "output": {"uri": str(tmp_path / "out")},
        }
    )


def test_plan_checks_columns_ids_and_skips_committed(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    table = pa.table({"id": ["a", "b", "c"], "image": [b"x"] * 3})
    pq.write_table(table, tmp_path / "in" / "s0.parquet")
    pq.write_table(pa.table({"id": ["d"], "image": [b"x"]}), tmp_path / "in" / "s1.parquet")
    spec = _spec(tmp_path)
    commit.commit_table(FS, str(tmp_path / "out"), rows(["a", "d"]), "r", fingerprint(spec))
    plan = make_plan(spec)
    assert (plan.items_total, plan.items_skipped, plan.items_pending) == (4, 2, 2)
    assert [Path(p).name for p in plan.pending_files] == ["s0.parquet"] and plan.skip_ids == ["a"]
    assert not plan.has_question
    with pytest.raises(StorageError, match=r"missing column\(s\) \['photo'\]"):
        make_plan(_spec(tmp_path, image_column="photo"))
    pq.write_table(pa.table({"id": ["a"], "image": [b"x"]}), tmp_path / "in" / "s2.parquet")
    with pytest.raises(StorageError, match="duplicate ids"):
        make_plan(_spec(tmp_path))


def test_plan_refuses_output_of_another_config(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": ["a"], "image": [b"x"]}), tmp_path / "in" / "s0.parquet")
    commit.commit_table(FS, str(tmp_path / "out"), rows(["a"]), "r", "0123456789abcdef")
    with pytest.raises(StorageError, match="different job config"):
        make_plan(_spec(tmp_path))


def test_plan_checks_column_types(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    table = pa.table({"id": ["a"], "image": ["not bytes"], "question": [3]})
    pq.write_table(table, tmp_path / "in" / "s0.parquet")
    with pytest.raises(
        StorageError, match=r"wrong column type.*question \(int64\).*image \(string\)"
    ):
        make_plan(_spec(tmp_path))
