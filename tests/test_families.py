"""The family registry: one list of families everywhere, and a checkpoint of any other family
refused in one line (exit 2) at validate and at planning, before any actor starts."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.__main__ import main as cli
from pipeline.job.checks import FAMILIES as SPEC_FAMILIES
from resprune.models import ADAPTERS, FAMILIES
from resprune.tiny import FAMILIES as TINY_FAMILIES


def test_every_family_has_an_adapter_a_spec_value_and_a_tiny_builder():
    from pipeline.cli.tiny import FAMILIES as CLI_FAMILIES

    assert set(FAMILIES) == set(SPEC_FAMILIES) == set(TINY_FAMILIES) == set(CLI_FAMILIES)
    assert all(ADAPTERS[f].family == f for f in FAMILIES)


def _job(tmp_path: Path, model_type: str | None, family: str = "auto") -> Path:
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": ["a"], "image": [b"x"]}), tmp_path / "in" / "p.parquet")
    (tmp_path / "m").mkdir()
    config = {"model_type": model_type} if model_type else {"architectures": ["X"]}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    doc = {
        "name": "t",
        "input": {"uri": str(tmp_path / "in")},
        "model": {"path": str(tmp_path / "m"), "family": family},
        "output": {"uri": str(tmp_path / "out")},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize(
    "command", [["validate"], ["validate", "--deep"], ["run", "--no-progress"]]
)
@pytest.mark.parametrize("model_type", ["mllama", None])
def test_unsupported_family_is_refused_in_one_line(tmp_path, capsys, command, model_type):
    job = _job(tmp_path, model_type)
    assert cli([command[0], str(job), *command[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model.path") and "\n" not in err
    assert f"unsupported model_type {model_type!r}" in err and "qwen3_vl" in err
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def test_family_other_than_the_checkpoints_is_refused(tmp_path, capsys):
    job = _job(tmp_path, "llava", family="qwen3_vl")
    assert cli(["validate", str(job)]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.family is 'qwen3_vl' but config.json's model_type is 'llava'" in err
