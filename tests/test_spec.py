"""The job spec: strict keys, every error listed with its path, overrides, run dates, CLI exits."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.__main__ import main as cli
from pipeline.spec import SpecError, load_spec, parse_spec

MINIMAL = {"name": "t", "input": {"uri": "in/"}, "model": {"path": "m/"}, "output": {"uri": "out/"}}


def write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_minimal_spec_gets_defaults() -> None:
    spec = parse_spec(MINIMAL)
    assert spec.pruning.method == "resprune" and spec.execution.gpus_per_actor == 1


def test_all_errors_reported_at_once_with_paths() -> None:
    bad = MINIMAL | {
        "typo": 1,
        "pruning": {"keep": 0, "methd": "x"},
        "execution": {"actors": [3, 1]},
    }
    with pytest.raises(SpecError) as info:
        parse_spec(bad)
    text = str(info.value)
    for where in ("typo", "pruning.keep", "pruning.methd", "execution.actors"):
        assert where in text
    assert "problem(s)" in text.splitlines()[0]


def test_keep_accepts_int_or_fraction_not_bool() -> None:
    assert parse_spec(MINIMAL | {"pruning": {"keep": 0.25}}).pruning.keep == 0.25
    assert parse_spec(MINIMAL | {"pruning": {"keep": 128}}).pruning.keep == 128
    with pytest.raises(SpecError):
        parse_spec(MINIMAL | {"pruning": {"keep": True}})
    with pytest.raises(SpecError):
        parse_spec(MINIMAL | {"pruning": {"keep": 1.5}})


def test_run_date_and_overrides(tmp_path: Path) -> None:
    doc = MINIMAL | {"input": {"uri": "s3://b/in/{run_date}/"}, "output": {"uri": "o/{run_date}"}}
    sets = ["execution.gpus_per_actor=0", "pruning.keep=0.5"]
    spec, date = load_spec(write(tmp_path, doc), run_date="2026-11-24", overrides=sets)
    assert (date, spec.input.uri, spec.output.uri) == (
        "2026-11-24",
        "s3://b/in/2026-11-24/",
        "o/2026-11-24",
    )
    assert spec.execution.gpus_per_actor == 0 and spec.pruning.keep == 0.5
    with pytest.raises(SpecError, match="run-date"):
        load_spec(write(tmp_path, doc), run_date="24/11/2026")
    with pytest.raises(SpecError, match=r"key\.path=value"):
        load_spec(write(tmp_path, doc), overrides=["novalue"])


def test_credentials_refused_in_runtime_env() -> None:
    doc = MINIMAL | {"runtime_env": {"env_vars": {"AWS_SECRET_ACCESS_KEY": "x", "MODE": "a"}}}
    with pytest.raises(SpecError, match="AWS_SECRET_ACCESS_KEY"):
        parse_spec(doc)
    with pytest.raises(SpecError, match=r"runtime_env\.pypi"):
        parse_spec(MINIMAL | {"runtime_env": {"pypi": ["x"]}})


def test_one_image_source() -> None:
    spec = parse_spec(MINIMAL | {"input": {"uri": "i", "image_uri_column": "path"}})
    assert spec.input.image_column is None
    with pytest.raises(SpecError, match="exactly one"):
        parse_spec(MINIMAL | {"input": {"uri": "i", "image_column": None}})


def test_validate_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli(["validate", str(write(tmp_path, MINIMAL))]) == 0
    assert cli(["validate", str(write(tmp_path, MINIMAL | {"bogus": 1}))]) == 2
    assert "bogus" in capsys.readouterr().err


def test_run_fails_fast_before_any_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Whole-job problems: one line on stderr, exit 2, no Ray and no model load."""
    missing_input = MINIMAL | {
        "input": {"uri": str(tmp_path / "none")},
        "output": {"uri": str(tmp_path / "o")},
    }
    assert cli(["run", str(write(tmp_path, missing_input)), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: input.uri ") and err.endswith("none does not exist")
    assert "\n" not in err


def _input(tmp_path: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "in").mkdir(exist_ok=True)
    pq.write_table(pa.table({"id": ["a"], "image": [b"x"]}), tmp_path / "in" / "p.parquet")
    return {"uri": str(tmp_path / "in")}


@pytest.mark.timeout(120)
def test_bad_model_path_and_unreachable_storage_fail_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = {"uri": str(tmp_path / "out")}
    bad_model = MINIMAL | {
        "input": _input(tmp_path),
        "model": {"path": str(tmp_path)},
        "output": out,
    }
    assert cli(["run", str(write(tmp_path, bad_model)), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model.path") and "config.json" in err and "\n" not in err
    dead = MINIMAL | {
        "input": {"uri": "s3://nowhere/in/"},
        "output": out,
        "storage": {"endpoint_url": "http://127.0.0.1:9"},
    }
    assert cli(["run", str(write(tmp_path, dead)), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: storage unreachable") and "\n" not in err


@pytest.mark.parametrize(
    ("pruning", "message"),
    [
        ({"relevance_floor": 0}, "relevance_floor"),
        ({"alpha": -6}, "float32 overflow"),
        ({"alpha": -11, "relevance_floor": 1e-3}, "float32 overflow"),
    ],
)
def test_relevance_floor_and_negative_alpha_are_validated(pruning, message) -> None:
    assert parse_spec(MINIMAL | {"pruning": {"alpha": -2.0}}).pruning.relevance_floor == 1e-6
    with pytest.raises(SpecError, match=message):
        parse_spec(MINIMAL | {"pruning": pruning})


def test_fingerprint_records_the_word_extractor_when_text_is_used(monkeypatch) -> None:
    from pipeline import spec as spec_module

    def fingerprints(pruning: dict) -> set[str]:
        found = set()
        for extractor in ("spacy", "stopwords"):
            monkeypatch.setattr(spec_module, "active_extractor", lambda e=extractor: e)
            found.add(spec_module.fingerprint(parse_spec(MINIMAL | {"pruning": pruning})))
        return found

    assert len(fingerprints({"method": "resprune"})) == 2
    assert len(fingerprints({"method": "resprune", "alpha": 0})) == 1
    assert len(fingerprints({"method": "uniform"})) == 1
