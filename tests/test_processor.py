"""The stage API: a processor composed with a user's own Ray Data steps, on real Ray."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import ray

from pipeline import ProcessorConfig, build_processor
from pipeline.io.storage import StorageError
from pipeline.spec import JobSpec
from resprune.tiny import build_tiny_checkpoint
from tests.input_helpers import vqa_dataset

pytestmark = pytest.mark.usefixtures("ray_session")


def test_config_has_every_section_the_stages_read() -> None:
    """The job runs through the processor: its config must carry every section but where
    the data lives (name, output, runtime_env) and what judges a whole night (monitoring,
    gate: the end-of-run record, notification and gate belong to `pipeline run`)."""
    job_only = {"name", "output", "runtime_env", "monitoring", "gate"}
    assert set(JobSpec.model_fields) - job_only == set(ProcessorConfig.model_fields)


def test_processor_between_user_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_tiny_checkpoint("llava", tmp_path / "model")
    hf = vqa_dataset(tmp_path / "vqa", monkeypatch)
    monkeypatch.chdir(tmp_path)
    config = ProcessorConfig.model_validate(
        {
            "input": {
                "id_column": "key",
                "question_column": "prompt",
                "passthrough_columns": ["answers", "tag"],
                "image_root": str(tmp_path / "vqa"),
            },
            "model": {"path": str(model), "max_new_tokens": 2},
            "pruning": {"keep": 8},
            "execution": {"batch_size": 2, "preprocess_batch_size": 2},
            "cost": {"shadow_fraction": 0.0},
        }
    )
    ds = ray.data.from_arrow(hf.with_format("arrow")[:])
    ds = ds.map(
        lambda r: r | {"key": f"vqa-{r['id']}", "prompt": r["question"], "tag": r["meta"]["source"]}
    )
    ds = ds.filter(lambda r: r["id"] != "rocket")
    processor = build_processor(config, run_date="2026-11-24")
    out = processor(ds).filter(lambda r: r["status"] == "ok")
    out = out.map(lambda r: r | {"hit": r["answer"] in r["answers"]})
    out.write_parquet(str(tmp_path / "answers"))
    files = str(tmp_path / "answers" / "*.parquet")
    loaded = datasets.load_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "hf"))
    rows = {r["id"]: r for r in loaded["train"]}
    assert sorted(rows) == ["vqa-cat", "vqa-coffee"]  # broken is an error row, rocket filtered
    assert rows["vqa-cat"]["answers"] == ["cat", "a cat"] and rows["vqa-coffee"]["tag"] == "s1"
    assert rows["vqa-cat"]["kept_tokens"] == 8 and rows["vqa-cat"]["run_date"] == "2026-11-24"
    assert rows["vqa-coffee"]["question"] == config.model.default_question
    assert isinstance(rows["vqa-cat"]["hit"], bool)
    with pytest.raises(StorageError, match=r"missing column\(s\) \['key', 'tag'\]"):
        processor(ray.data.from_arrow(hf.with_format("arrow")[:]))
