"""A new user's first day (issue 22): img2dataset exports, the stage API beside Ray Data's
own readers, retries, and the small things a newcomer hits. Real Ray, real files, tiny model."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import ray
import yaml
from PIL import Image

from pipeline import build_processor
from pipeline.__main__ import main as cli
from pipeline.cli.submit import local_path_warnings, runtime_env, submission_id
from pipeline.filters import FilterError, apply_filter, filter_columns, parse_filter
from pipeline.io.images import decode_image
from pipeline.io.inputs import detect
from pipeline.io.storage import StorageError, filesystem
from pipeline.report.render import _html_cell
from pipeline.spec import InputSpec, ProcessorConfig, SpecError, parse_spec
from pipeline.stages.processor import fit_to_cluster

ASSETS = Path(__file__).resolve().parent.parent / "pipeline" / "assets" / "images"
DATE = "2026-11-24"


def _spec(**sections) -> dict:
    doc = {"name": "n", "input": {"uri": "in"}, "model": {"path": "org/m"}, "output": {"uri": "o"}}
    for key, value in sections.items():
        doc[key] = doc.get(key, {}) | value if isinstance(value, dict) else value
    return doc


# ---- spec, filter grammar, small messages


def test_a_bad_keep_is_one_message_without_pydantic_tags() -> None:
    for bad in (-5, 0, 1.5, -0.2):
        with pytest.raises(SpecError) as err:
            parse_spec(_spec(pruning={"keep": bad}))
        text = str(err.value)
        assert "1 problem(s)" in text and "pruning.keep" in text and f"got {bad}" in text
        assert "constrained" not in text and "int]" not in text
    assert parse_spec(_spec(pruning={"keep": 0.25})).pruning.keep == 0.25


ROWS = pa.table(
    {
        "status": ["success", "failed_to_download", None, "success"],
        "width": [640, 0, 12, 32],
        "url": ["a", None, "c", "d"],
        "odd name": [1, 2, 3, 4],
    }
)


@pytest.mark.parametrize(
    ("text", "keep"),
    [
        ("status == 'success'", lambda r: r["status"] == "success"),
        ("status != 'success'", lambda r: r["status"] is not None and r["status"] != "success"),
        ("width >= 32 and not status is None", lambda r: r["width"] >= 32 and r["status"]),
        (
            "status in ['success', 'x'] or is_null(url)",
            lambda r: r["status"] == "success" or r["url"] is None,
        ),
        ("(col('odd name') > 1) & (width < 100)", lambda r: r["odd name"] > 1 and r["width"] < 100),
        ("url is not None and 10 < width", lambda r: r["url"] is not None and r["width"] > 10),
    ],
)
def test_filter_expressions_select_what_python_would(text: str, keep) -> None:
    want = [r for r in ROWS.to_pylist() if keep(r)]
    assert apply_filter(ROWS, text).to_pylist() == want


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('x')",
        "status.upper() == 'X'",
        "width + 1 > 2",
        "url[0] == 'a'",
        "1 == 1",
        "status ==",
        "lambda: 1",
        "open('f')",
        "x == -'a'",
        "x == -True",
        "not " * 3000 + "x == 1",
        "(x == 1 and " * 70 + "x == 1" + ")" * 70,
        "x in [1, 'a']",
        "x < [1]",
        "x == None",
    ],
)
def test_filter_refuses_anything_outside_the_grammar(text: str) -> None:
    with pytest.raises(FilterError):
        parse_filter(text)
    with pytest.raises(SpecError, match=r"1 problem\(s\).*\n  - input.filter: "):
        parse_spec(_spec(input={"filter": text}))


def test_filter_columns_and_rename_rules() -> None:
    assert filter_columns("is_valid(url) and col('odd name') == 1") == ["url", "odd name"]
    with pytest.raises(SpecError, match="not in passthrough_columns"):
        parse_spec(_spec(input={"passthrough_rename": {"status": "s"}}))
    both = {"passthrough_columns": ["a", "b"], "passthrough_rename": {"a": "b"}}
    with pytest.raises(SpecError, match="named alike"):
        parse_spec(_spec(input=both))


def test_new_input_keys_left_unset_keep_the_fingerprint() -> None:
    from pipeline.spec import fingerprint

    plain = parse_spec(_spec())
    assert fingerprint(plain) == fingerprint(parse_spec(_spec(input={"passthrough_rename": {}})))
    assert fingerprint(plain) != fingerprint(parse_spec(_spec(input={"filter": "a == 1"})))


def test_a_missing_input_folder_says_it_does_not_exist(tmp_path: Path) -> None:
    uri = str(tmp_path / "nowhere")
    fs, path = filesystem(uri)
    with pytest.raises(StorageError, match=r"^input.uri .*nowhere does not exist$"):
        detect(fs, path, InputSpec(uri=uri))
    (tmp_path / "empty").mkdir()
    fs, path = filesystem(str(tmp_path / "empty"))
    with pytest.raises(StorageError, match="no Parquet files"):
        detect(fs, path, InputSpec(uri=str(tmp_path / "empty")))


def test_undecodable_names_the_decoder_message_not_a_memory_address() -> None:
    from resprune.items import ItemError

    caps = {"max_bytes": 10_000, "max_pixels": 10_000, "max_aspect": 5.0}
    with pytest.raises(ItemError) as err:
        decode_image(b"<html>not found</html>", **caps)
    assert err.value.cause == "undecodable"
    assert "cannot identify image file" in err.value.message and "0x" not in err.value.message
    assert "b'<html>no'" in err.value.message


def test_report_refuses_a_folder_that_is_not_an_output(tmp_path: Path, capsys) -> None:
    rows = [{"id": "a", "image": b"x", "status": "error"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "shard-000.parquet")
    assert cli(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a job's output" in err
    assert not (tmp_path / "_report").exists()


def test_no_wrap_is_chosen_on_the_escaped_text() -> None:
    assert 'class="short"' in _html_cell("yes")
    controls = "\x00\x01\x02\x03\x04\x05"  # 6 characters, 24 once shown as \x00 escapes
    assert 'class="short"' not in _html_cell(controls)
    assert "\\x00\\x01" in _html_cell(controls)


def test_tiny_command_builds_a_loadable_checkpoint(tmp_path: Path, capsys) -> None:
    assert cli(["tiny", str(tmp_path / "tiny")]) == 0
    assert json.loads((tmp_path / "tiny" / "config.json").read_text())["resprune_tiny_random"]
    assert "--set model.path=" in capsys.readouterr().out


# ---- submit: attempt ids, local paths as Ray's upload sees them


def test_retries_of_a_failed_night_get_attempt_ids() -> None:
    from ray.job_submission import JobStatus

    def client(*jobs: tuple[str, JobStatus]) -> SimpleNamespace:
        listed = [SimpleNamespace(submission_id=s, status=st) for s, st in jobs]
        return SimpleNamespace(list_jobs=lambda: listed)

    base = f"demo-{DATE}"
    assert submission_id(client(), base) == (base, None)
    assert submission_id(client((base, JobStatus.FAILED)), base) == (f"{base}-2", None)
    done = client((base, JobStatus.FAILED), (f"{base}-2", JobStatus.SUCCEEDED), ("x", None))
    assert submission_id(done, base) == (f"{base}-2", JobStatus.SUCCEEDED)
    running = client(
        (base, JobStatus.STOPPED), (f"{base}-2", JobStatus.FAILED), (f"{base}-3", JobStatus.RUNNING)
    )
    assert submission_id(running, base) == (f"{base}-3", JobStatus.RUNNING)
    other = client((f"{base}-extra", JobStatus.FAILED))
    assert submission_id(other, base) == (base, None)


def test_local_relative_paths_the_upload_leaves_out_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for folder in ("data/in", "ignored/model", "kept/model", "scratch/in"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / ".gitignore").write_text("ignored/\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", raising=False)
    doc = _spec(
        input={"uri": "data/in/"},
        model={"path": "ignored/model/"},
        output={"uri": "s3://bucket/out/"},
        runtime_env={"excludes": ["data"]},
    )
    spec = parse_spec(doc)
    lines = local_path_warnings(spec, runtime_env(spec))
    assert len(lines) == 2
    assert "input.uri 'data/in/'" in lines[0] and "runtime_env excludes" in lines[0]
    assert "model.path 'ignored/model/'" in lines[1] and ".gitignore" in lines[1]
    fine = parse_spec(doc | {"model": {"path": "kept/model"}, "runtime_env": {}})
    fine.input.uri = "scratch/in"
    assert local_path_warnings(fine, runtime_env(fine)) == []
    relative_out = parse_spec(doc | {"output": {"uri": "results/"}, "runtime_env": {}})
    lines = local_path_warnings(relative_out, runtime_env(relative_out))
    assert any("output.uri 'results/'" in line for line in lines)
    assert not any("'org/m'" in line for line in local_path_warnings(spec, runtime_env(spec)))


# ---- on real Ray: sizing, img2dataset exports, a failed night, the stage API


@pytest.mark.usefixtures("ray_session")
def test_default_layout_fits_a_small_cluster_and_explicit_settings_are_kept(caplog) -> None:
    total = int(ray.cluster_resources()["CPU"])
    base = {"model": {"path": "m"}, "execution": {"actors": total}}
    sized = fit_to_cluster(ProcessorConfig.model_validate(base))
    assert sized.execution.cpus_per_actor == 0  # total actors x 1 CPU + 2 would not fit
    fits = ProcessorConfig.model_validate({"model": {"path": "m"}})
    assert fit_to_cluster(fits).execution.cpus_per_actor == 1
    explicit = ProcessorConfig.model_validate(
        {"model": {"path": "m"}, "execution": {"actors": total, "cpus_per_actor": 1}}
    )
    assert fit_to_cluster(explicit).execution.cpus_per_actor == 1
    assert "may stall" in caplog.text and "ray.init(num_cpus=" in caplog.text  # started here


def _img2dataset_parquet(folder: Path, n_ok: int, n_failed: int) -> list[str]:
    """Parquet as img2dataset's `output_format=parquet` writes it: failed downloads stay as
    rows with status != "success" and a null jpg."""
    pictures = sorted(ASSETS.glob("*.jpg"))
    rows = []
    for i in range(n_ok + n_failed):
        ok = i < n_ok
        rows.append(
            {
                "key": f"{i:09d}",
                "jpg": pictures[i % len(pictures)].read_bytes() if ok else None,
                "caption": f"caption {i}",
                "url": f"http://127.0.0.1/img/{i}.jpg",
                "status": "success" if ok else "failed_to_download",
                "error_message": None if ok else "HTTP 404",
                "width": 512 if ok else None,
            }
        )
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "00000.parquet")
    return [r["key"] for r in rows if r["status"] == "success"]


def _job(tmp_path: Path, model: Path, out: str, **input_extra) -> Path:
    doc = {
        "name": "laion",
        "input": {
            "uri": str(tmp_path / "in"),
            "id_column": "key",
            "image_column": "jpg",
            "question_column": None,
            "passthrough_columns": ["caption", "url"],
        }
        | input_extra,
        "model": {"path": str(model), "max_new_tokens": 1},
        "pruning": {"keep": 8},
        "execution": {
            "batch_size": 5,
            "gpus_per_actor": 0,
            "error_fraction_min_items": 5,
        },
        "output": {"uri": str(tmp_path / out), "min_rows_per_file": 5},
        "cost": {"shadow_fraction": 0.0},
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _summaries(out: Path) -> list[dict]:
    docs = [json.loads(p.read_text()) for p in sorted((out / "_runs").glob("*.json"))]
    return sorted(docs, key=lambda d: d["started_at"])


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(400)
def test_img2dataset_parquet_a_failed_night_sticks_and_a_filter_fixes_it(
    tiny_llava: Path, tmp_path: Path, capsys
) -> None:
    ok_keys = _img2dataset_parquet(tmp_path / "in", n_ok=4, n_failed=1)
    raw = _job(tmp_path, tiny_llava, "raw")
    assert cli(["run", str(raw), "--run-date", DATE, "--no-progress"]) == 1
    first = capsys.readouterr()
    assert "failed: error fraction 0.200 > execution.max_error_fraction 0.05" in first.out
    # the rerun has nothing left to answer, and the night still failed
    assert cli(["run", str(raw), "--run-date", DATE, "--no-progress"]) == 1
    again = capsys.readouterr().out
    assert "0 ok, 0 error, 5 skipped of 5" in again and "1 of 5 items committed" in again
    runs = _summaries(tmp_path / "raw")
    assert [r["status"] for r in runs] == ["failed", "failed"]
    assert runs[1]["error_fraction"]["items"] == 5 and runs[1]["error_fraction"]["errors"] == 1
    assert runs[1]["error_fraction"]["scope"].startswith("output prefix")
    # the user's tool already marked those rows: filter them, keep its status under a new name
    fixed = _job(
        tmp_path,
        tiny_llava,
        "filtered",
        filter="status == 'success'",
        passthrough_columns=["caption", "url", "status"],
        passthrough_rename={"status": "download_status"},
    )
    assert cli(["validate", str(fixed), "--deep", "--run-date", DATE]) == 0
    assert "input.filter: 1 row(s) dropped before counting" in capsys.readouterr().out
    assert cli(["run", str(fixed), "--run-date", DATE, "--no-progress"]) == 0
    assert "4 ok, 0 error, 0 skipped of 4" in capsys.readouterr().out
    (doc,) = _summaries(tmp_path / "filtered")
    assert doc["input_filter"] == "status == 'success'" and doc["items_filtered_out"] == 1
    assert doc["gpu_type"] == "cpu" and doc["dtype"] == "float32" and doc["device"] == "cpu"
    table = pads.dataset(str(tmp_path / "filtered"), format="parquet").to_table()
    assert sorted(table.column("id").to_pylist()) == ok_keys
    assert set(table.column("download_status").to_pylist()) == {"success"}
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert table.column("caption").to_pylist()[0].startswith("caption ")


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(300)
def test_read_images_and_pil_rows_through_build_processor_with_hooks(
    tiny_llava: Path, tmp_path: Path
) -> None:
    marks = tmp_path / "ran"
    marks.mkdir()

    def user_step(row: dict) -> dict:  # the user's own step; building must not run it
        (marks / Path(row["path"]).name).touch()
        return row

    config = {
        "model": {"path": str(tiny_llava), "max_new_tokens": 2},
        "pruning": {"keep": 8},
        "execution": {"batch_size": 4, "gpus_per_actor": 0},
        "cost": {"shadow_fraction": 0.0},
    }
    processor = build_processor(
        config,
        preprocess=lambda r: {"id": Path(r["path"]).stem, "image": r["image"], "question": None},
        postprocess=lambda r: {"id": r["id"], "caption": r["answer"], "ok": r["status"] == "ok"},
    )
    images = ray.data.read_images(str(ASSETS), include_paths=True, mode="RGB").map(user_step)
    out = processor(images)
    assert list(marks.iterdir()) == []  # built lazily: nothing of the user's pipeline ran
    rows = {r["id"]: r for r in out.take_all()}
    names = sorted(p.stem for p in ASSETS.iterdir() if p.suffix in (".jpg", ".png"))
    assert sorted(rows) == names and len(list(marks.iterdir())) == len(names)
    assert all(r["ok"] and isinstance(r["caption"], str) for r in rows.values())
    assert set(next(iter(rows.values()))) == {"id", "caption", "ok"}
    # PIL images from a user's map, and one the caps refuse (numpy rows: the next test)
    pixels = [Image.open(ASSETS / "chelsea.jpg").convert("RGB"), Image.new("RGB", (400, 1))]
    ds = ray.data.range(2).map(lambda r: {"id": f"pil{r['id']}", "image": pixels[r["id"]]})
    got = {r["id"]: r for r in build_processor(config)(ds).take_all()}
    assert got["pil0"]["status"] == "ok" and got["pil0"]["answer"] == rows["chelsea"]["caption"]
    assert got["pil1"]["error_cause"] == "bad_aspect"


def test_numpy_rows_decode_like_the_same_pixels_encoded() -> None:
    from pipeline.io.images import from_pixels
    from resprune.items import ItemError

    caps = {"max_pixels": 10_000_000, "max_aspect": 50.0}
    data = (ASSETS / "camera.png").read_bytes()
    encoded = decode_image(data, max_bytes=len(data), **caps)
    arr = np.asarray(Image.open(ASSETS / "camera.png"))
    for pixels in (arr, arr[:, :, None], np.dstack([arr] * 3)):
        got = from_pixels(pixels, **caps)
        assert got.mode == "RGB" and np.array_equal(np.asarray(got), np.asarray(encoded))
    for bad, cause in (
        (arr.astype(np.float32), "unsupported_mode"),
        (np.zeros((2, 2, 2), np.uint8), "unsupported_mode"),
        (np.zeros((1, 400), np.uint8), "bad_aspect"),
    ):
        with pytest.raises(ItemError) as err:
            from_pixels(bad, **caps)
        assert err.value.cause == cause


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(600)
def test_the_readmes_offline_eval_example_runs(tmp_path: Path, capsys) -> None:
    """examples/eval_canary.py builds the canary and its eval.yaml; `pipeline eval` on it
    scores the unpruned configuration 1.0 (the references are its own answers)."""
    import runpy

    script = Path(__file__).resolve().parent.parent / "examples" / "eval_canary.py"
    eval_yaml = runpy.run_path(str(script))["main"](tmp_path / "eval")
    assert eval_yaml == tmp_path / "eval" / "eval.yaml"
    argv = ["eval", str(eval_yaml), "--fail-below", "0.95"]
    rc = cli([*argv, "--set", "eval.compare=[{method: uniform, keep: 64}]"])
    assert rc in (0, 1)  # random weights: the gate may go either way
    summary = json.loads((tmp_path / "eval" / "out" / "eval.json").read_text())
    assert summary["configs"]["none"]["vqa_accuracy"] == pytest.approx(1.0)
    assert sorted(summary["configs"]) == ["none", "resprune@64", "uniform@64"]
    assert summary["common_items"] == len([p for p in ASSETS.iterdir() if p.suffix != ".md"])
