"""Every shipped job spec validates, and the generated schemas in schemas/ are current."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from pipeline.cli.schemas import SCHEMA_DIR, stale
from pipeline.eval.spec import EvalSpec
from pipeline.spec import load_spec

JOBS = sorted((Path(__file__).resolve().parent.parent / "jobs").glob("*.yaml"))


def test_there_are_jobs() -> None:
    assert {p.name for p in JOBS} >= {"caption.yaml", "demo.yaml"}


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_job_validates(path: Path) -> None:
    """Job specs, and eval files (``eval-*.yaml``, for `pipeline eval`)."""
    is_eval = path.name.startswith("eval-")
    spec, _ = load_spec(path, run_date="2026-11-24", kind=EvalSpec if is_eval else None)
    assert "{run_date}" not in spec.input.uri + spec.output.uri
    name = "eval_spec.schema.json" if is_eval else "job_spec.schema.json"
    schema = json.loads((SCHEMA_DIR / name).read_text())
    jsonschema.validate(yaml.safe_load(path.read_text()), schema)


def test_caption_job_is_the_real_nightly() -> None:
    spec, _ = load_spec(JOBS[0].parent / "caption.yaml", run_date="2026-11-24")
    assert spec.model.path == "llava-hf/llava-1.5-7b-hf"
    assert spec.output.uri == "s3://resprune-data/captions/run_date=2026-11-24/"
    assert spec.execution.gpus_per_actor == 1


def test_schemas_are_current() -> None:
    assert stale() == [], "run `python -m pipeline schemas`"
