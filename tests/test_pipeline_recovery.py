"""Output prefixes in every layout, read-only refusals, the fingerprint, and the commit race.

Driver-side only (no Ray): planning, recovery and de-duplication on local folders and on the
S3 fixture, with `key=value` segments in the prefixes (hive partitions are never inferred).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.__main__ import main as cli
from pipeline.io.storage import StorageError, filesystem
from pipeline.job.plan import make_plan
from pipeline.output import commit, prefix
from pipeline.output.columns import output_schema
from pipeline.report.load import load_output
from pipeline.spec import fingerprint, fingerprint_fields, parse_spec

DATE = "2026-11-24"


def rows(ids: list[str], run_date: str = DATE) -> pa.Table:
    data = [{"id": i, "status": "ok", "new_tokens": 3, "run_date": run_date} for i in ids]
    return pa.Table.from_pylist(data, schema=output_schema())


def job(inp: str, out: str, model: str, **pruning) -> dict:
    return {
        "name": "t",
        "input": {"uri": inp},
        "model": {"path": model},
        "pruning": pruning,
        "output": {"uri": out},
    }


def write_input(fs: pafs.FileSystem, root: str, ids: list[str]) -> None:
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(f"{root}/s0.parquet") as f:
        pq.write_table(pa.table({"id": ids, "image": [b"x"] * len(ids)}), f)


def snapshot(fs: pafs.FileSystem, root: str) -> dict[str, str]:
    """Every object under ``root`` with a hash of its bytes."""
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = [i.path for i in infos if i.type == pafs.FileType.File]
    out = {}
    for path in files:
        with fs.open_input_stream(path) as f:
            out[path] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture
def model(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llava"}')
    return folder


@pytest.fixture(params=["local", "s3"])
def layout(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(input uri, output uri) with `key=value` segments, several levels deep."""
    if request.param == "local":
        base = str(tmp_path)
        return f"{base}/in/dt={DATE}/", f"{base}/out/dt={DATE}/hour=03/"
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/incoming/dt={DATE}/", f"s3://{bucket}/captions/run_date={DATE}/"


def test_resume_plan_in_partition_style_prefixes(layout: tuple[str, str], model: Path) -> None:
    """Committed files whose rows hold a `run_date` column under `run_date=...` used to fail
    with "Field run_date has incompatible types"; planning, recovery and reading all work."""
    inp, out = layout
    in_fs, in_root = filesystem(inp)
    write_input(in_fs, in_root, ["a", "b", "c", "d"])
    spec = parse_spec(job(inp, out, str(model)))
    fs, root = filesystem(out)
    done = commit.commit_table(fs, root, rows(["a", "b"]), "r1", fingerprint(spec))
    fs.move(f"{root}/{done['file']}", f"{root}/_staging/{done['file']}")  # killed mid-commit
    commit.commit_table(fs, root, rows(["c"]), "r1", fingerprint(spec))
    plan = make_plan(spec, run_id="r2")
    assert (plan.items_total, plan.items_skipped, plan.recovered_files) == (4, 3, 1)
    assert plan.skip_ids == ["a", "b", "c"]
    ds = pads.dataset(root, filesystem=fs, format="parquet", partitioning=None)
    assert sorted(ds.to_table(columns=["id"]).column(0).to_pylist()) == ["a", "b", "c"]
    (night,) = load_output(out)
    assert sorted(night.columns["id"]) == ["a", "b", "c"]


def test_validate_deep_and_refusals_touch_nothing(
    s3_server, s3_bucket: str, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`validate --deep` and a run refused for another config leave the prefix byte-identical
    (no probe, no lease, no recovery of the live run's unmarked staging file)."""
    inp, out = f"s3://{s3_bucket}/in/dt={DATE}/", f"s3://{s3_bucket}/captions/run_date={DATE}/"
    in_fs, in_root = filesystem(inp)
    write_input(in_fs, in_root, ["a", "b"])
    fs, root = filesystem(out)
    live = parse_spec(job(inp, out, str(model)))
    commit.take_lease(fs, root, "live-run")
    commit.commit_table(
        fs, root, rows(["a"]), "live-run", fingerprint(live), fingerprint_fields(live)
    )
    with fs.open_output_stream(f"{root}/_staging/part-inflight.parquet") as f:
        pq.write_table(rows(["b"]), f)  # the live run's write before its marker
    before = snapshot(fs, root)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job(inp, out, str(model))))
    assert cli(["validate", str(path), "--deep"]) == 0
    assert "1 of 2 items pending" in capsys.readouterr().out
    assert snapshot(fs, root) == before
    path.write_text(yaml.safe_dump(job(inp, out, str(model), keep=32)))
    assert cli(["run", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "pruning.keep (32 now, 64 there)" in err and "new output.uri" in err
    assert snapshot(fs, root) == before


def test_fingerprint_ignores_how_the_model_path_is_spelled(model: Path, tmp_path: Path) -> None:
    here = os.getcwd()
    try:
        os.chdir(model.parent)
        relative = parse_spec(job("in", "out", "./model/"))
        absolute = parse_spec(job("in", "out", str(model)))
        assert fingerprint(relative) == fingerprint(absolute)
        assert fingerprint_fields(relative)["model.path"] == os.path.realpath(model)
    finally:
        os.chdir(here)
    other = parse_spec(job("in", "out", str(model), alpha=0.5))
    assert fingerprint(other) != fingerprint(absolute)
    hub = parse_spec(job("in", "out", "org/name"))
    assert fingerprint_fields(hub)["model.path"] == "org/name"


def test_an_orphaned_commit_after_the_rerun_planned_is_deduplicated(
    tmp_path: Path, model: Path
) -> None:
    """The race, driven step by step: an old writer passes its lease check, the rerun takes
    the lease and plans (the old rows look pending), the old writer commits, the rerun
    commits the same ids; at the end every id is committed once, in the rerun's file."""
    inp, out = str(tmp_path / "in"), str(tmp_path / f"out/run_date={DATE}")
    write_input(pafs.LocalFileSystem(), inp, ["a", "b", "c"])
    spec = parse_spec(job(inp, out, str(model)))
    fs, root = filesystem(out)
    commit.take_lease(fs, root, "old")
    commit._check_lease(fs, root, "old")  # the old writer passed its check ...
    plan = make_plan(spec, run_id="new")  # ... the rerun takes the prefix and plans ...
    assert plan.items_pending == 3
    commit._publish(
        fs, root, rows(["a", "b"]), {"run_id": "old", "spec_fingerprint": fingerprint(spec)}
    )  # ... then the old marker lands
    mine = commit.commit_table(fs, root, rows(["a", "b", "c"]), "new", fingerprint(spec))
    assert sorted(commit.committed_ids(fs, root)) == ["a", "b", "c"]
    assert commit.dedupe(fs, root) == 1
    assert [m["run_id"] for m in prefix.scan(fs, root).markers.values()] == ["new"]
    ids = pads.dataset(root, format="parquet", partitioning=None).to_table().column("id")
    assert sorted(ids.to_pylist()) == ["a", "b", "c"]
    assert sorted(os.listdir(root)) == ["_manifest", "_runs", "_staging", mine["file"]]


def test_dedupe_keeps_the_rows_an_older_file_alone_holds(tmp_path: Path) -> None:
    fs, root = pafs.LocalFileSystem(), str(tmp_path)
    commit.commit_table(fs, root, rows(["a", "b", "x"]), "old")
    commit.commit_table(fs, root, rows(["a", "b"]), "new")
    assert commit.recover(fs, root) == 1
    state = prefix.scan(fs, root)
    ids = prefix.read_ids(fs, state)
    held = {state.markers[name]["run_id"]: sorted(i) for name, i in ids.items()}
    assert held == {"old": ["x"], "new": ["a", "b"]}
    assert state.markers[commit.file_name(["x"])]["rows"] == 1  # stats follow the rewrite
    with pytest.raises(StorageError, match="without commit markers"):
        pq.write_table(rows(["z"]), tmp_path / "foreign.parquet")
        commit.recover(fs, root)
