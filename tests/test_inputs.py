"""Input formats end to end on real Ray: `datasets` exports, WebDataset shards, local and S3."""

from __future__ import annotations

import argparse
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pipeline.__main__ import main as cli
from pipeline.cli import validate as cli_validate
from pipeline.io.webdataset import ShardError, sample_keys
from pipeline.job import runner
from pipeline.job.plan import make_plan
from pipeline.output import commit
from pipeline.spec import JobSpec, ProcessorConfig, parse_spec
from pipeline.stages.preprocess import Preprocess
from resprune.tiny import build_tiny_checkpoint
from tests.input_helpers import ASSETS, export_hub_layout, sample, vqa_dataset, write_shard

DATE = "2026-11-24"
pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module", autouse=True)
def quiet_datasets() -> None:
    datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint("llava", tmp_path_factory.mktemp("model"))


def job(model: Path | str, inp: str, out: str, **inp_keys: object) -> JobSpec:
    return parse_spec(
        {
            "name": "inputs",
            "input": {"uri": inp, **inp_keys},
            "model": {"path": str(model), "max_new_tokens": 2},
            "pruning": {"keep": 8},
            "execution": {"batch_size": 2, "preprocess_batch_size": 2},
            "output": {"uri": out, "min_rows_per_file": 1},
            "cost": {"shadow_fraction": 0.0},
        }
    )


def validate_deep(spec: JobSpec, tmp_path: Path, capsys: pytest.CaptureFixture) -> str:
    doc = spec.model_dump(mode="json")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    args = argparse.Namespace(
        spec=str(tmp_path / "job.yaml"), run_date=DATE, overrides=[], deep=True
    )
    assert cli_validate.main(args) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def output(uri: str, fs: pafs.FileSystem | None = None) -> dict[str, dict]:
    rows = pads.dataset(uri, format="parquet", filesystem=fs).to_table().to_pylist()
    assert len({r["id"] for r in rows}) == len(rows), "duplicate ids in the output"
    return {r["id"]: r for r in rows}


def check_vqa_rows(got: dict[str, dict], spec: JobSpec) -> None:
    """The vqa_dataset rows: three images found three ways, one broken; columns carried."""
    assert sorted(got) == ["broken", "cat", "coffee", "rocket"]
    assert [got[i]["status"] for i in ("cat", "coffee", "rocket")] == ["ok"] * 3
    assert got["broken"]["error_cause"] == "undecodable" and "id=broken" in got["broken"]["error"]
    assert got["coffee"]["question"] == spec.model.default_question
    assert got["cat"]["answers"] == ["cat", "a cat"] and got["rocket"]["answers"] == []
    assert got["coffee"]["meta"] == {"source": "s1", "votes": 1}
    assert got["cat"]["kept_tokens"] == 8 and got["cat"]["answer"] is not None


def test_hub_parquet_layout_local_with_paths(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """to_parquet keeps path-only images: relative to the dataset folder, and absolute."""
    hub = export_hub_layout(vqa_dataset(tmp_path / "hub", monkeypatch), tmp_path / "hub")
    monkeypatch.chdir(tmp_path)  # relative paths must not depend on the working directory
    spec = job(model, str(hub), str(tmp_path / "out"), passthrough_columns=["answers", "meta"])
    report = validate_deep(spec, tmp_path, capsys)
    assert "input: parquet" in report and "datasets Image() struct {bytes, path}" in report
    doc = runner.run_job(spec, DATE, progress=False)
    assert (doc["status"], doc["items_ok"], doc["items_error"]) == ("finished", 3, 1)
    check_vqa_rows(output(str(tmp_path / "out")), spec)
    loaded = datasets.load_dataset(
        "parquet",
        data_files=str(tmp_path / "out" / "*.parquet"),
        cache_dir=str(tmp_path / "hf-cache"),
    )
    assert sorted(loaded["train"]["id"]) == ["broken", "cat", "coffee", "rocket"]
    again = runner.run_job(spec, DATE, progress=False)
    assert (again["items_processed"], again["items_skipped"]) == (0, 4)


@pytest.mark.slow
def test_save_to_disk_folder_on_s3(
    model: Path,
    tmp_path: Path,
    s3_server,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """A DatasetDict saved to disk, uploaded as is; one split is read (state.json's files)."""
    ds = vqa_dataset(tmp_path / "src", monkeypatch)
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "sd"))
    client = s3_server.client()
    for f in (tmp_path / "sd").rglob("*"):
        if f.is_file():
            client.upload_file(str(f), s3_bucket, f"vqa/{f.relative_to(tmp_path / 'sd')}")
    client.put_object(Bucket=s3_bucket, Key="vqa/train/cache-0123.arrow", Body=b"not data")
    spec = job(
        model,
        f"s3://{s3_bucket}/vqa/train",
        f"s3://{s3_bucket}/out",
        passthrough_columns=["answers", "meta"],
    )
    report = validate_deep(spec, tmp_path, capsys)
    assert "input: datasets, 1 file(s)" in report and "datasets Image() struct" in report
    doc = runner.run_job(spec, DATE, progress=False)
    assert (doc["status"], doc["items_ok"], doc["items_error"]) == ("finished", 3, 1)
    fs, root = pafs.S3FileSystem(endpoint_override=s3_server.endpoint), f"{s3_bucket}/out"
    check_vqa_rows(output(root, fs), spec)
    again = runner.run_job(spec, DATE, progress=False)
    assert (again["items_processed"], again["items_skipped"]) == (0, 4)


def test_shard_listing_refuses_what_ray_would_crash_on(tmp_path: Path) -> None:
    fs = pafs.LocalFileSystem()
    jpg = (ASSETS / "chelsea.jpg").read_bytes()
    good = [sample(f"{i:09d}", jpg, {"caption": "c"}, "c") for i in range(3)]
    data = write_shard(tmp_path / "good.tar", good)
    assert sample_keys(fs, str(tmp_path / "good.tar")) == [f"{i:09d}" for i in range(3)]
    cases = {
        "middle": (data[: len(data) // 2], "unexpected end of data"),
        "boundary": (data[: data.index(b"000000002.jpg")], "no end-of-archive marker"),
    }
    for name, (cut, message) in cases.items():
        (tmp_path / f"{name}.tar").write_bytes(cut)
        with pytest.raises(ShardError, match=message):
            sample_keys(fs, str(tmp_path / f"{name}.tar"))
    write_shard(tmp_path / "split.tar", [good[0][:1], good[1], good[0][1:]])
    with pytest.raises(ShardError, match="not contiguous"):
        sample_keys(fs, str(tmp_path / "split.tar"))


def img2dataset_shards(folder: Path) -> dict[str, str]:
    """Three shards: a good one, one with a corrupt image and a bad .json, one cut short.

    Returns the expected status or error cause per sample key of the readable shards.
    """
    jpg = {n: (ASSETS / n).read_bytes() for n in ("chelsea.jpg", "coffee.jpg", "rocket.jpg")}
    meta = {"url": "http://x", "status": "success"}
    write_shard(
        folder / "00000.tar",
        [
            sample("000000000", jpg["chelsea.jpg"], meta | {"question": "Which animal?"}, "a cat"),
            sample("000000001", jpg["coffee.jpg"], meta, "a cup of coffee"),
        ],
    )
    write_shard(
        folder / "00001.tar",
        [
            sample("000010000", jpg["rocket.jpg"][:300] + b"\0" * 64, meta, "corrupt jpeg"),
            sample("000010001", jpg["rocket.jpg"], b"{not json", "bad json member"),
            sample("000010002", jpg["rocket.jpg"], meta | {"question": "What is it?"}, "a rocket"),
        ],
    )
    cut = write_shard(folder / "00002.tar", [sample("000020000", jpg["coffee.jpg"], meta, "c")])
    (folder / "00002.tar").write_bytes(cut[: len(cut) // 2])
    return {
        "000000000": "ok",
        "000000001": "ok",
        "000010000": "undecodable",
        "000010001": "bad_member",
        "000010002": "ok",
    }


def test_webdataset_local_faults_and_resume(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Corrupt members become error rows, a cut shard a whole-shard error; a rerun resumes."""
    expect = img2dataset_shards(tmp_path / "shards")
    out = tmp_path / "out"
    spec = job(model, str(tmp_path / "shards"), str(out), passthrough_columns=["txt", "url"])
    report = validate_deep(spec, tmp_path, capsys)
    assert "input: webdataset, 3 file(s)" in report and "member .jpg|" in report
    assert "00002.tar: not a readable tar shard: unexpected end of data" in report
    doc = runner.run_job(spec, DATE, progress=False)
    assert doc["status"] == "failed" and list(doc["unreadable_shards"]) == [
        str(tmp_path / "shards" / "00002.tar")
    ]
    got = output(str(out))
    assert {
        k: r["status"] if r["status"] == "ok" else r["error_cause"] for k, r in got.items()
    } == expect
    assert got["000000000"]["question"] == "Which animal?" and got["000000000"]["txt"] == "a cat"
    assert got["000000001"]["question"] == spec.model.default_question
    assert got["000010001"]["error"].startswith("id=000010001: bad_member: member 000010001.json")
    # A crash before one file's commit point: drop it; and the shard is re-uploaded whole.
    lost = commit.committed_files(pafs.LocalFileSystem(), str(out))[0]
    lost_ids = set(output(lost))
    Path(lost).unlink()
    (out / commit.MANIFEST / (Path(lost).name + ".json")).unlink()
    write_shard(
        tmp_path / "shards" / "00002.tar",
        [sample("000020000", (ASSETS / "coffee.jpg").read_bytes(), {}, "c")],
    )
    again = runner.run_job(spec, DATE, progress=False)
    assert again["status"] == "finished" and not again["unreadable_shards"]
    assert again["items_processed"] == len(lost_ids) + 1
    assert again["items_skipped"] == len(expect) - len(lost_ids)
    assert sorted(output(str(out))) == sorted([*expect, "000020000"])


@pytest.mark.slow
def test_webdataset_on_s3_with_a_question_field(
    model: Path, s3_server, s3_bucket: str, tmp_path: Path
) -> None:
    jpg = (ASSETS / "chelsea.jpg").read_bytes()
    write_shard(
        tmp_path / "s.tar",
        [
            sample("a0", jpg, {"prompt": "Colour?", "n": 3}, "cat"),
            sample("a1", jpg, {"n": 4}, "cat"),
        ],
    )
    s3_server.client().upload_file(str(tmp_path / "s.tar"), s3_bucket, "wds/00000.tar")
    spec = job(
        model,
        f"s3://{s3_bucket}/wds/",
        f"s3://{s3_bucket}/out",
        format="webdataset",
        question_column="prompt",
        passthrough_columns=["n"],
    )
    doc = runner.run_job(spec, DATE, progress=False)
    assert (doc["status"], doc["items_ok"]) == ("finished", 2)
    got = output(f"{s3_bucket}/out", pafs.S3FileSystem(endpoint_override=s3_server.endpoint))
    assert (got["a0"]["question"], got["a0"]["n"]) == ("Colour?", "3")
    assert got["a1"]["question"] == spec.model.default_question


def test_struct_paths_resolve_against_an_s3_folder(
    model: Path, tmp_path: Path, s3_server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub layout on S3 with path-only images: relative paths become s3:// URIs."""
    hub = export_hub_layout(vqa_dataset(tmp_path / "hub", monkeypatch), tmp_path / "hub")
    client = s3_server.client()
    for f in (hub / "data" / "train-00000-of-00001.parquet", hub / "images" / "coffee.jpg"):
        client.upload_file(str(f), s3_bucket, f"hub/{f.relative_to(hub)}")
    spec = job(model, f"s3://{s3_bucket}/hub", str(tmp_path / "out"))
    plan = make_plan(spec)
    assert (plan.dataset_folder, plan.items_total) == (f"s3://{s3_bucket}/hub", 4)
    config = ProcessorConfig.from_job(spec, dataset_folder=plan.dataset_folder)
    paths = ["images/coffee.jpg", f"s3://{s3_bucket}/hub/images/coffee.jpg", "images/no.jpg"]
    images = [{"bytes": None, "path": p} for p in paths]
    batch = pa.table({"id": ["rel", "abs", "missing"], "image": images})
    out = Preprocess(config, [])(batch).to_pylist()
    assert [r["image_width"] for r in out[:2]] == [Image.open(hub / "images/coffee.jpg").width] * 2
    assert (
        out[2]["error_cause"] == "fetch_failed"
        and f"{s3_bucket}/hub/images/no.jpg" in out[2]["error"]
    )


def test_integer_ids_and_a_datasetdict_with_several_splits(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The hub's int64 question ids come out as their decimal strings (and resume by them);
    a DatasetDict root with several splits is refused naming them, or read as input.split."""
    ds = vqa_dataset(tmp_path / "src", monkeypatch)
    ds = ds.add_column("question_id", [262148000 + i for i in range(4)])
    assert ds.features["question_id"].dtype == "int64"
    splits = {"train": ds, "validation": ds.select([0, 1])}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dd"))
    keys = {"id_column": "question_id", "passthrough_columns": ["answers"]}
    merged = job(model, str(tmp_path / "dd"), str(tmp_path / "out"), **keys)
    (tmp_path / "merged.yaml").write_text(yaml.safe_dump(merged.model_dump(mode="json")))
    for deep in ([], ["--deep"]):  # plain validate reads the folder's metadata too
        assert cli(["validate", str(tmp_path / "merged.yaml"), *deep]) == 2
        err = capsys.readouterr().err
        assert "DatasetDict with splits ['train', 'validation']: set input.split" in err
    spec = job(model, str(tmp_path / "dd"), str(tmp_path / "out"), split="validation", **keys)
    assert "storage ok: 2 of 2 items pending" in validate_deep(spec, tmp_path, capsys)
    doc = runner.run_job(spec, DATE, progress=False)
    assert (doc["status"], doc["items_ok"]) == ("finished", 2)
    got = output(str(tmp_path / "out"))
    assert sorted(got) == ["262148000", "262148001"] and got["262148000"]["answers"] == [
        "cat",
        "a cat",
    ]
    again = runner.run_job(spec, DATE, progress=False)
    assert (again["items_processed"], again["items_skipped"]) == (0, 2)


def test_plain_validate_checks_column_types_from_metadata(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    jpg = (ASSETS / "chelsea.jpg").read_bytes()
    (tmp_path / "in").mkdir()
    table = pa.table({"id": [7, 8], "image": [jpg, jpg], "question": [1, 2]})
    pq.write_table(table, tmp_path / "in" / "part-0.parquet")
    spec = job("org/model", str(tmp_path / "in"), str(tmp_path / "out"))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    assert cli(["validate", str(tmp_path / "job.yaml")]) == 2  # no --deep: no ids read
    assert "wrong column type(s) ['question (int64)']" in capsys.readouterr().err
    table = table.set_column(2, "question", pa.array(["a?", "b?"]))
    pq.write_table(table, tmp_path / "in" / "part-0.parquet")
    assert cli(["validate", str(tmp_path / "job.yaml")]) == 0  # integer ids are fine
    assert "input: parquet, 1 file(s); images: encoded bytes" in capsys.readouterr().out
    missing = job("org/model", str(tmp_path / "later"), str(tmp_path / "out"))
    (tmp_path / "later.yaml").write_text(yaml.safe_dump(missing.model_dump(mode="json")))
    assert cli(["validate", str(tmp_path / "later.yaml")]) == 0
    assert "nothing at" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_parquet_is_read_by_tasks_without_a_footer_actor_pool(tmp_path: Path) -> None:
    """Ray Data's V2 Parquet path starts 32 FooterReader actors per read, each needing a free
    CPU to be placed; the job's reader takes the listed files through read tasks only."""
    import ray

    from pipeline.io.readers import read_parquet_files

    table = pa.table({"id": ["a", "b", "c"], "image": [b"1", b"2", b"3"], "extra": [1, 2, 3]})
    pq.write_table(table, tmp_path / "part-0.parquet")
    ctx = ray.data.DataContext.get_current()
    before = ctx.use_datasource_v2
    ds = read_parquet_files([str(tmp_path / "part-0.parquet")], pafs.LocalFileSystem(), ["id"])
    assert sorted(r["id"] for r in ds.take_all()) == ["a", "b", "c"]
    assert ds.schema().names == ["id"]
    assert ctx.use_datasource_v2 == before  # the caller's setting is left as it was
    names = {a["ActorClassName"] for a in ray._private.state.actors().values()}
    assert "FooterReader" not in names
