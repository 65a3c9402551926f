"""The vLLM engine against the transformers engine: greedy ids, per-row refusals, the pipeline.

Runs in the vLLM environment (`make test-vllm`); skipped where vLLM is not installed. One
engine per family for the whole session (each start costs tens of seconds on CPU). The tiny
models have head_dim 32 (vLLM's CPU attention has no kernel for smaller heads).
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

pytest.importorskip("vllm")

from pipeline.job import runner
from pipeline.job.checks import ModelPathError, check_engine
from pipeline.spec import SpecError, parse_spec
from resprune.answer import answer_batch
from resprune.engines import build_engine
from resprune.engines.hf import TransformersEngine
from resprune.engines.vllm_engine import UnsupportedByVllm
from resprune.items import ItemError, ItemResult
from resprune.loading import load_preprocessor, load_vlm
from resprune.pruners import build_pruner
from resprune.tiny import build_tiny_checkpoint
from tests.vlm_helpers import images, prepared

pytestmark = pytest.mark.vllm
HEADS = {"heads": 2, "kv_heads": 1}  # head_dim 32
MAX_MODEL_LEN = 1024
NEW_TOKENS = 8
KEEPS = {"llava": [8, 20, 0.5, 1.0], "llava_next": [16, 64, 0.25, 1.0]}


class Recording(TransformersEngine):
    """The reference engine, keeping every plan it was given."""

    def __init__(self, vlm):
        super().__init__(vlm)
        self.plans = []

    def generate(self, plans, max_new_tokens):
        self.plans.extend(plans)
        return super().generate(plans, max_new_tokens)


@pytest.fixture(scope="session")
def families(tmp_path_factory) -> dict:
    """Per family: the checkpoint, the reference VLM, prepared items, the vLLM engine."""
    out = {}
    for family in KEEPS:
        path = str(build_tiny_checkpoint(family, tmp_path_factory.mktemp(family), **HEADS))
        items = prepared(load_preprocessor(path))
        engine = build_engine("vllm", load_vlm(path), max_model_len=MAX_MODEL_LEN)
        out[family] = {"path": path, "ref": load_vlm(path), "items": items, "engine": engine}
    return out


def reference(fam: dict, keeps: list) -> tuple[list, list]:
    """Plans and transformers' greedy ids for every item at every keep (contiguous)."""
    engine, ids = Recording(fam["ref"]), []
    for keep in keeps:
        results = answer_batch(
            fam["ref"],
            fam["items"],
            pruner=build_pruner("resprune"),
            keep=keep,
            max_new_tokens=NEW_TOKENS,
            position_policy="contiguous",
            engine=engine,
        )
        assert all(isinstance(r, ItemResult) for r in results), results
        ids += [r.answer_ids for r in results]
    return engine.plans, ids


@pytest.mark.parametrize("family", list(KEEPS))
def test_greedy_ids_equal_transformers_in_one_mixed_batch(families, family):
    fam = families[family]
    plans, expected = reference(fam, KEEPS[family])
    sizes = {int(p.features.shape[0]) for p in plans}
    assert len(sizes) >= 4  # different K per request, all in one generate call
    got = fam["engine"].generate(plans, NEW_TOKENS)
    fits = [len(p.ids) + NEW_TOKENS <= MAX_MODEL_LEN for p in plans]
    assert sum(fits) >= 9
    for g, e, ok in zip(got, expected, fits, strict=True):
        assert g.token_ids == e if ok else g.cause == "prompt_too_long"
    text = fam["ref"].tokenizer.decode(expected[0], skip_special_tokens=True).strip()
    assert got[0].text == text


def test_a_failing_request_is_one_error_row(families):
    """In one batch: LLaVA-NeXT unpruned prompts that do not fit max_model_len, and one
    request vLLM itself refuses (embeddings of the wrong width); only those rows fail."""
    fam = families["llava_next"]
    plans, expected = reference(fam, [20, 1.0])
    hidden = plans[0].features.shape[1]
    plans[1] = dataclasses.replace(plans[1], features=torch.zeros(20, hidden + 8))
    got = fam["engine"].generate(plans, NEW_TOKENS)
    too_long = [len(p.ids) + NEW_TOKENS > MAX_MODEL_LEN for p in plans]
    assert any(too_long) and not all(too_long)
    assert isinstance(got[1], ItemError) and got[1].cause == "model_error"
    assert "vLLM refused the request" in got[1].message and str(hidden) in got[1].message
    for i, (g, e, long) in enumerate(zip(got, expected, too_long, strict=True)):
        if long:
            assert isinstance(g, ItemError) and g.cause == "prompt_too_long"
            assert f"max_model_len {MAX_MODEL_LEN}" in g.message
        elif i != 1:
            assert g.token_ids == e


def test_answer_batch_through_vllm_keeps_statistics(families):
    fam = families["llava"]
    pruner = build_pruner("resprune")
    kw = {
        "pruner": pruner,
        "keep": 20,
        "max_new_tokens": NEW_TOKENS,
        "position_policy": "contiguous",
    }
    ours = answer_batch(fam["engine"].vlm, fam["items"], engine=fam["engine"], **kw)
    ref = answer_batch(fam["ref"], fam["items"], **kw)
    for a, b in zip(ours, ref, strict=True):
        assert (a.answer_ids, a.answer, a.kept_indices) == (b.answer_ids, b.answer, b.kept_indices)
        assert a.kept_tokens == 20 and a.generate_s > 0


def test_qwen_is_refused_in_one_line(tmp_path):
    path = str(build_tiny_checkpoint("qwen2_5_vl", tmp_path / "qwen", **HEADS))
    with pytest.raises(UnsupportedByVllm, match="vllm takes llava and llava_next only") as err:
        build_engine("vllm", load_vlm(path))
    assert "\n" not in str(err.value)
    doc = {
        "name": "q",
        "input": {"uri": "in/"},
        "output": {"uri": "out/"},
        "model": {"path": path, "family": "qwen2_5_vl", "engine": "vllm"},
        "pruning": {"position_policy": "contiguous"},
    }
    with pytest.raises(SpecError, match="not qwen2_5_vl"):
        parse_spec(doc)
    doc["model"]["family"] = "auto"  # validate --deep reads the family from config.json
    with pytest.raises(ModelPathError, match="not qwen2_5_vl"):
        check_engine(parse_spec(doc))


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(400)
def test_pipeline_end_to_end_on_s3_with_engine_vllm(families, s3_server, s3_bucket):
    """Real Ray, real S3: pruned and unpruned (shadow) answers equal transformers'."""
    fam = families["llava"]
    client = s3_server.client()
    for f in Path(fam["path"]).iterdir():
        client.upload_file(str(f), s3_bucket, f"model/{f.name}")
    table = pa.table(
        {
            "id": [f"i{n}" for n in range(3)],
            "image": [_png(im) for im in images()],
            "question": ["What is the cat doing?", "Describe it.", None],
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    client.put_object(Bucket=s3_bucket, Key="in/part-0.parquet", Body=buf.getvalue())
    doc = {
        "name": "vllm-e2e",
        "input": {"uri": f"s3://{s3_bucket}/in/"},
        "model": {
            "path": f"s3://{s3_bucket}/model",
            "max_new_tokens": NEW_TOKENS,
            "engine": "vllm",
            "vllm": {"max_model_len": MAX_MODEL_LEN},
        },
        "pruning": {"keep": 20, "position_policy": "contiguous"},
        "execution": {"batch_size": 4, "preprocess_batch_size": 4},
        "output": {"uri": f"s3://{s3_bucket}/out/run_date=2026-11-30/"},
        "cost": {"shadow_fraction": 1.0},
    }
    summary = runner.run_job(parse_spec(doc), "2026-11-30", progress=False)
    assert (summary["status"], summary["items_ok"], summary["items_error"]) == ("finished", 3, 0)
    fs = pafs.S3FileSystem(endpoint_override=s3_server.endpoint, region="us-east-1")
    out = pads.dataset(f"{s3_bucket}/out/run_date=2026-11-30/", format="parquet", filesystem=fs)
    rows = {r["id"]: r for r in out.to_table().to_pylist()}
    assert sorted(rows) == ["i0", "i1", "i2"]
    pre, default = load_preprocessor(fam["path"]), parse_spec(doc).model.default_question
    questions = [q or default for q in table.column("question").to_pylist()]
    items = [pre.prepare(im, q) for im, q in zip(images(), questions, strict=True)]
    kw = {"max_new_tokens": NEW_TOKENS, "position_policy": "contiguous"}
    ref = answer_batch(fam["ref"], items, pruner=build_pruner("resprune"), keep=20, **kw)
    unpruned = answer_batch(fam["ref"], items, pruner=build_pruner("none"), keep=1.0, **kw)
    for n, (r, u) in enumerate(zip(ref, unpruned, strict=True)):
        row = rows[f"i{n}"]
        assert row["status"] == "ok" and row["answer"] == r.answer, row
        assert row["kept_tokens"] == 20 and row["gpu_seconds"] > 0
        assert row["shadow"] and row["shadow_answer"] == u.answer
        assert row["shadow_gpu_seconds"] > 0 and row["shadow_prompt_tokens"] > 576


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
