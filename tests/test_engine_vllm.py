"""The vLLM engine against the transformers engine: greedy ids, per-row refusals, a dead
engine, the pipeline.

Runs in the vLLM environment (`make test-vllm`); skipped where vLLM is not installed. One
engine per family for the whole session (each start costs tens of seconds on CPU). The tiny
models have head_dim 32 (vLLM's CPU attention has no kernel for smaller heads).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
import yaml

pytest.importorskip("vllm")

from pipeline import faults
from pipeline.__main__ import main as cli
from pipeline.job import runner
from pipeline.job.checks import ModelPathError, check_engine
from pipeline.spec import parse_spec
from resprune.answer import answer_batch
from resprune.engines import EngineDead, build_engine, vllm_plugin
from resprune.engines.vllm_plugin import UnsupportedVllm
from resprune.items import ItemError
from resprune.loading import load_preprocessor
from resprune.pruners import build_pruner
from tests.vllm_helpers import NEW_TOKENS, reference, vllm_family
from tests.vlm_helpers import images

pytestmark = pytest.mark.vllm
MAX_MODEL_LEN = 1024
KEEPS = {
    "llava": [8, 20, 0.5, 1.0],
    "llava_next": [16, 64, 0.25, 1.0],
    "qwen2_5_vl": [8, 20, 0.5, 1.0],  # 3 images of 3 sizes x 4 budgets: 12 requests
}
# the position policies vLLM answers as transformers does (resprune.engines.vllm_plugin)
POLICIES = {"llava": "contiguous", "llava_next": "contiguous", "qwen2_5_vl": "original"}


@pytest.fixture(scope="session")
def families(tmp_path_factory) -> dict:
    """Per family: the checkpoint, the reference VLM, prepared items, the vLLM engine."""
    out = {}
    for family in KEEPS:
        out[family] = vllm_family(family, tmp_path_factory.mktemp(family), MAX_MODEL_LEN)
    return out


@pytest.mark.parametrize(
    ("family", "policy"),
    [(f, p) for f, p in POLICIES.items()] + [("qwen2_5_vl", "contiguous")],
)
def test_greedy_ids_equal_transformers_in_one_mixed_batch(families, family, policy):
    fam = families[family]
    plans, expected = reference(fam, KEEPS[family], policy)
    sizes = {int(p.features.shape[0]) for p in plans}
    assert len(plans) == 12 and len(sizes) >= 4  # different K per request, one generate call
    if family == "qwen2_5_vl":  # 3 image sizes, 3 grids (one taller than wide)
        grids = {tuple(int(v) for v in it.image_grid_thw) for it in fam["items"]}
        assert len(grids) == 3 and any(h > w for _, h, w in grids)
    got = fam["engine"].generate(plans, NEW_TOKENS)
    fits = [len(p.ids) + NEW_TOKENS <= MAX_MODEL_LEN for p in plans]
    assert sum(fits) >= 9
    for g, e, ok in zip(got, expected, fits, strict=True):
        assert g.token_ids == e if ok else g.cause == "prompt_too_long"
    text = fam["ref"].tokenizer.decode(expected[0], skip_special_tokens=True).strip()
    assert got[0].text == text


def test_qwen_positions_reach_vllm(families):
    """The kept tokens' M-RoPE positions decide answers here (the two policies differ for
    some request), and vLLM follows each plan's own: both policies in one generate call."""
    fam = families["qwen2_5_vl"]
    plans, expected = [], []
    for policy in ("original", "contiguous"):
        p, e = reference(fam, KEEPS["qwen2_5_vl"], policy)
        plans, expected = plans + p, expected + e
    assert expected[:12] != expected[12:]
    got = fam["engine"].generate(plans, NEW_TOKENS)
    assert [g.token_ids for g in got] == expected


def test_qwen_positions_vllm_cannot_take_are_that_rows_error(families):
    fam = families["qwen2_5_vl"]
    plans, expected = reference(fam, [20])
    bad = plans[1].positions.clone()
    bad[:, -1] += 5  # the text after the image not numbered contiguously
    plans[1] = dataclasses.replace(plans[1], positions=bad)
    got = fam["engine"].generate(plans, NEW_TOKENS)
    assert got[1].cause == "model_error" and "positions vLLM cannot take" in got[1].message
    assert [got[0].token_ids, got[2].token_ids] == [expected[0], expected[2]]


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


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_answer_batch_through_vllm_keeps_statistics(families, family):
    fam = families[family]
    pruner = build_pruner("resprune")
    kw = {
        "pruner": pruner,
        "keep": 20,
        "max_new_tokens": NEW_TOKENS,
        "position_policy": POLICIES[family],
    }
    ours = answer_batch(fam["engine"].vlm, fam["items"], engine=fam["engine"], **kw)
    ref = answer_batch(fam["ref"], fam["items"], **kw)
    for a, b in zip(ours, ref, strict=True):
        assert (a.answer_ids, a.answer, a.kept_indices) == (b.answer_ids, b.answer, b.kept_indices)
        assert a.kept_tokens == 20 and a.generate_s > 0


@pytest.mark.parametrize("death", ["EngineDeadError", "RuntimeError"])
def test_an_engine_that_dies_mid_batch_is_dead_not_an_items_fault(families, death):
    """The engine core fails on its second step, with requests of the batch in flight
    (multiprocess: vLLM's EngineDeadError; in-process on CPU: the core's own exception):
    `EngineDead` for the batch and every later call, classified systemic (the model actor
    exits at once, no error rows); the requests are dropped from the engine."""
    from vllm.v1.engine.exceptions import EngineDeadError

    fam = families["llava"]
    plans, expected = reference(fam, [20, 8])
    engine = copy.copy(fam["engine"])  # the session's engine stays alive for other tests
    core = engine.llm.llm_engine.engine_core
    steps = []

    def dies_on_the_second_step():
        steps.append(1)
        if len(steps) == 2:
            raise EngineDeadError() if death == "EngineDeadError" else RuntimeError("core fault")
        return type(core).get_output(core)

    core.get_output = dies_on_the_second_step
    try:
        with pytest.raises(EngineDead, match="the vLLM engine failed") as info:
            engine.generate(plans, NEW_TOKENS)
    finally:
        del core.get_output
    assert len(steps) == 2 and faults.classify(info.value) == faults.SYSTEMIC
    with pytest.raises(EngineDead):  # dead for good: the actor must restart, not retry items
        engine.generate(plans[:1], NEW_TOKENS)
    assert len(steps) == 2
    assert not engine.llm.llm_engine.has_unfinished_requests()  # dropped from the core
    again = fam["engine"].generate(plans, NEW_TOKENS)
    assert [g.token_ids for g in again] == expected


def test_validate_takes_qwen_with_the_policies_equal_between_engines(families, tmp_path):
    doc = {
        "name": "q",
        "input": {"uri": "in/"},
        "output": {"uri": "out/"},
        "model": {"path": families["qwen2_5_vl"]["path"], "family": "auto", "engine": "vllm"},
    }
    for policy in ("original", "contiguous"):
        doc["pruning"] = {"position_policy": policy}
        check_engine(parse_spec(doc))  # validate --deep: config.json says qwen2_5_vl
    doc["model"]["path"] = families["llava"]["path"]
    doc["pruning"] = {"position_policy": "original"}
    with pytest.raises(ModelPathError, match="vLLM takes contiguous") as err:
        check_engine(parse_spec(doc))
    assert "\n" not in str(err.value)


def test_an_unsupported_vllm_is_refused_in_one_line(families, monkeypatch):
    monkeypatch.setattr(vllm_plugin, "vllm_version", lambda: "0.34.0")
    refused = r"supports vLLM 0\.32\.x, 0\.33\.x, not 0\.34\.0"
    with pytest.raises(UnsupportedVllm, match=refused) as err:
        build_engine("vllm", families["llava"]["ref"])  # before vLLM starts
    assert "\n" not in str(err.value)
    doc = {
        "name": "q",
        "input": {"uri": "in/"},
        "output": {"uri": "out/"},
        "model": {"path": families["llava"]["path"], "engine": "vllm"},
        "pruning": {"position_policy": "contiguous"},
    }
    with pytest.raises(ModelPathError, match=r"not 0\.34\.0"):
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


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(600)
def test_qwen_through_pipeline_run_under_run_date_resumed_each_id_once(families, tmp_path, capsys):
    """`python -m pipeline run` with Qwen2.5-VL on vLLM (original positions), output under
    run_date=; a second run after more input arrived answers only the new rows; every id is
    committed once, its answer the transformers engine's."""
    fam = families["qwen2_5_vl"]
    questions = ["What is the cat doing?", "Describe it.", "How many red cars are there?"]
    rows = [
        {"id": f"q{n}", "image": _png(im), "question": q}
        for n, (im, q) in enumerate(zip(images(), questions, strict=True))
    ]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:2]), tmp_path / "in" / "part-0.parquet")
    doc = {
        "name": "qwen-vllm",
        "input": {"uri": str(tmp_path / "in")},
        "model": {
            "path": fam["path"],
            "max_new_tokens": NEW_TOKENS,
            "engine": "vllm",
            "vllm": {"max_model_len": MAX_MODEL_LEN},
        },
        "pruning": {"keep": 20, "position_policy": "original"},
        "execution": {"batch_size": 4, "preprocess_batch_size": 4, "gpus_per_actor": 0},
        "output": {"uri": str(tmp_path / "out" / "run_date={run_date}")},
        "cost": {"shadow_fraction": 0.0},
    }
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    argv = ["run", str(job), "--no-progress", "--run-date", "2026-12-01"]
    assert cli(argv) == 0
    assert "finished: 2 ok, 0 error, 0 skipped of 2" in capsys.readouterr().out
    pq.write_table(pa.Table.from_pylist(rows[2:]), tmp_path / "in" / "part-1.parquet")
    assert cli(argv) == 0  # resumes: the committed ids are skipped
    assert "finished: 1 ok, 0 error, 2 skipped of 3" in capsys.readouterr().out
    out = tmp_path / "out" / "run_date=2026-12-01"
    table = pads.dataset(str(out), format="parquet", partitioning=None).to_table()
    got = table.to_pylist()
    assert sorted(r["id"] for r in got) == ["q0", "q1", "q2"]  # each id once
    pre = load_preprocessor(fam["path"])
    items = [pre.prepare(im, q) for im, q in zip(images(), questions, strict=True)]
    kw = {"max_new_tokens": NEW_TOKENS, "position_policy": "original"}
    ref = answer_batch(fam["ref"], items, pruner=build_pruner("resprune"), keep=20, **kw)
    by_id = {r["id"]: r for r in got}
    for n, r in enumerate(ref):
        row = by_id[f"q{n}"]
        assert row["status"] == "ok" and row["answer"] == r.answer and row["kept_tokens"] == 20
        assert row["kept_indices"] == r.kept_indices and row["gpu_seconds"] > 0
    runs = [json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")]
    assert sorted(r["items_ok"] for r in runs) == [1, 2]
    lease = json.loads((out / "_manifest" / "_lease.json").read_text())
    assert lease["run_id"] is None  # released by the run that held it


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_vllm_path_reads_the_device_once_per_batch(families, family):
    """`answer_batch` through vLLM: the same stream syncs (device reads, to-host copies) for
    one item as for three, at most the selection's and statistics' reads plus one for the
    engine (`host_plans`); vLLM's own work runs on its tensors and is not counted."""
    from tests.syncs import count_answer_batch_syncs

    fam = families[family]
    engine = fam["engine"]
    kw = {
        "pruner": build_pruner("resprune"),
        "keep": 20,
        "max_new_tokens": NEW_TOKENS,
        "position_policy": POLICIES[family],
        "engine": engine,
    }
    one = count_answer_batch_syncs(engine.vlm, fam["items"][:1], **kw)
    three = count_answer_batch_syncs(engine.vlm, fam["items"], **kw)
    assert three.syncs == one.syncs and three.total <= 3, three.syncs
