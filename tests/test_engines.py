"""The engine seam: registry, spec rules, what an engine receives, per-row engine errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from pipeline.__main__ import main as cli
from pipeline.spec import SpecError, parse_spec
from resprune.answer import answer_batch
from resprune.engines import EngineUnavailable, build_engine, engine_problem
from resprune.engines.hf import TransformersEngine
from resprune.items import ItemError, ItemResult
from resprune.pruners import build_pruner
from tests.vlm_helpers import prepared, tiny_vlm

MINIMAL = {"name": "t", "input": {"uri": "in/"}, "model": {"path": "m/"}, "output": {"uri": "out/"}}
NO_VLLM = pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm installed")


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    vlm, pre = tiny_vlm("llava", tmp_path_factory)
    return vlm, prepared(pre)


class Recording:
    """The transformers engine, recording the plans it is given; row ``fail`` is refused."""

    name = "recording"

    def __init__(self, vlm, fail: int | None = None):
        self.inner, self.fail, self.plans = TransformersEngine(vlm), fail, []

    def generate(self, plans, max_new_tokens):
        self.plans.append(list(plans))
        out = self.inner.generate(plans, max_new_tokens)
        if self.fail is not None:
            out[self.fail] = ItemError("engine_refused", "row refused by the engine")
        return out


def test_engine_receives_cut_prompts_and_kept_features(llava):
    vlm, items = llava
    engine = Recording(vlm)
    results = answer_batch(
        vlm, items, pruner=build_pruner("resprune"), keep=20, max_new_tokens=3, engine=engine
    )
    (plans,) = engine.plans
    image = vlm.model.config.image_token_id
    hidden = vlm.model.config.text_config.hidden_size
    for plan, item, res in zip(plans, items, results, strict=True):
        assert int((plan.ids == image).sum()) == 20 == plan.features.shape[0]
        assert plan.features.shape[1] == hidden and plan.features.dtype == vlm.model.dtype
        assert plan.positions.shape == (1, len(plan.ids)) and len(plan.ids) == res.prompt_tokens
        assert torch.equal(plan.prompt_ids.cpu(), torch.from_numpy(item.input_ids))
        # the non-image tokens are the unpruned prompt's, in order
        text = item.input_ids[item.input_ids != image]
        assert torch.equal(plan.ids[plan.ids != image].cpu(), torch.from_numpy(text))


def test_engine_row_error_is_that_items_error_only(llava):
    vlm, items = llava
    pruner = build_pruner("resprune")
    alone = answer_batch(vlm, items, pruner=pruner, keep=20, max_new_tokens=3)
    failing = answer_batch(
        vlm, items, pruner=pruner, keep=20, max_new_tokens=3, engine=Recording(vlm, fail=1)
    )
    assert isinstance(failing[1], ItemError) and failing[1].cause == "engine_refused"
    for i in (0, 2):
        assert isinstance(failing[i], ItemResult)
        assert failing[i].answer_ids == alone[i].answer_ids
        assert failing[i].generate_s > 0


def test_registry_builds_the_default_engine(llava):
    vlm, items = llava
    answer_batch(vlm, items[:1], pruner=None, keep=1.0, max_new_tokens=1)
    default = vlm.default_engine  # built once per VLM: its caches persist across calls
    answer_batch(vlm, items[1:2], pruner=None, keep=1.0, max_new_tokens=1)
    assert isinstance(default, TransformersEngine) and vlm.default_engine is default
    engine = build_engine("transformers", vlm)
    out = engine.generate([], 2)
    assert engine.name == "transformers" and out == []
    res = answer_batch(vlm, items[:1], pruner=None, keep=1.0, max_new_tokens=2, engine=engine)
    assert isinstance(res[0], ItemResult) and res[0].answer_ids


def test_unknown_engine_is_one_line():
    assert engine_problem("transformers") is None
    assert "unknown engine 'tgi'" in engine_problem("tgi")


def test_vllm_takes_exactly_the_policies_equal_between_engines():
    """vLLM numbers LLaVA positions 0..L-1 (contiguous only); a Qwen2.5-VL request carries its
    M-RoPE positions (original and contiguous; tests/test_engine_vllm.py checks both)."""
    for family in ("llava", "llava_next"):
        model = {"path": "m/", "engine": "vllm", "family": family}
        with pytest.raises(SpecError) as info:
            parse_spec(MINIMAL | {"model": model})  # the default policy is original
        assert "pruning.position_policy: original" in str(info.value)
        assert f"transformers for {family}; vLLM takes contiguous" in str(info.value)
    qwen = {"path": "m/", "engine": "vllm", "family": "qwen2_5_vl"}
    for policy in ("original", "contiguous"):
        spec = parse_spec(MINIMAL | {"model": qwen, "pruning": {"position_policy": policy}})
        assert spec.pruning.position_policy == policy
    # family auto: validate --deep (config.json) and the model actor decide
    assert parse_spec(MINIMAL | {"model": {"path": "m/", "engine": "vllm"}})
    model = {"path": "m/", "engine": "vllm", "vllm": {"max_num_seqs": 8}}
    ok = parse_spec(MINIMAL | {"model": model, "pruning": {"position_policy": "contiguous"}})
    assert ok.model.vllm.max_num_seqs == 8 and ok.model.vllm.max_model_len is None
    default = parse_spec(MINIMAL).model
    assert (default.engine, default.transformers.cache, default.transformers.compile) == (
        "transformers",
        "auto",
        None,
    )
    with pytest.raises(SpecError, match=r"model\.transformers\.cache"):
        parse_spec(MINIMAL | {"model": {"path": "m/", "transformers": {"cache": "paged"}}})


def test_vllm_version_guard_is_one_line(monkeypatch: pytest.MonkeyPatch):
    from resprune.engines import vllm_plugin

    for ok in ("0.32.0", "0.32.0+cpu", "0.33.1"):
        assert vllm_plugin.vllm_version_problem(ok) is None
    for bad in ("0.31.2", "0.34.0", "1.0.0"):
        line = vllm_plugin.vllm_version_problem(bad)
        assert f"not {bad}" in line and "0.32.x, 0.33.x" in line and "\n" not in line
    monkeypatch.setattr(vllm_plugin, "vllm_version", lambda: "0.34.0")
    assert "not 0.34.0" in vllm_plugin.vllm_version_problem()
    monkeypatch.setattr(vllm_plugin, "vllm_version", lambda: None)  # not installed: not ours
    assert vllm_plugin.vllm_version_problem() is None


class DiesMidBatch(TransformersEngine):
    """Answers its first call, then dies as vLLM's engine core does (EngineDeadError)."""

    def __init__(self, vlm):
        super().__init__(vlm)
        self.calls = 0

    def generate(self, plans, max_new_tokens):
        from resprune.engines import EngineDead

        self.calls += 1
        if self.calls > 1:
            raise EngineDead("the vLLM engine failed: EngineDeadError: EngineCore encountered ...")
        return super().generate(plans, max_new_tokens)


def test_a_dead_engine_exits_the_actor_at_once_and_writes_no_rows(
    tiny_llava: Path, monkeypatch: pytest.MonkeyPatch
):
    """Two model batches in one call; the engine dies in the second: the actor exits (Ray
    restarts it) without retrying items one by one, without error rows, without waiting for
    the 8-in-a-row rule."""
    import os

    from pipeline.stages.answer import Answerer
    from pipeline.stages.preprocess import Preprocess

    images = sorted(Path("pipeline/assets/images").glob("*.jpg"))[:4]
    rows = [{"id": p.stem, "image": p.read_bytes(), "question": "What is it?"} for p in images]
    spec = parse_spec(
        MINIMAL
        | {
            "model": {"path": str(tiny_llava), "max_new_tokens": 2},
            "execution": {"gpus_per_actor": 0, "batch_size": 2},
            "cost": {"shadow_fraction": 0.0},  # no twin: every engine call is a pruned batch
        }
    )
    batch = Preprocess(spec, [])(pa.Table.from_pylist(rows))
    actor = Answerer(spec, run_id="r", run_date="2026-01-01", passthrough=pa.schema([]))
    actor.engine = DiesMidBatch(actor.vlm)
    exits = []

    def exit_(code):
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", exit_)
    with pytest.raises(SystemExit):
        actor(batch)
    assert exits == [1] and actor.engine.calls == 2  # no solo retries after the death
    assert not any(actor.errors.recent)  # no model error in the window


@NO_VLLM
def test_vllm_not_installed_fails_validate_deep_and_actor_start(tmp_path: Path, capsys):
    from pipeline.stages.answer import Answerer

    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": ["a"], "image": [b"x"]}), tmp_path / "in" / "p.parquet")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "llava"}')
    doc = MINIMAL | {
        "input": {"uri": str(tmp_path / "in")},
        "model": {"path": str(tmp_path / "m"), "engine": "vllm"},
        "pruning": {"position_policy": "contiguous"},
        "output": {"uri": str(tmp_path / "out")},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert cli(["validate", str(path)]) == 0
    assert cli(["validate", str(path), "--deep"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model.engine: vllm needs the vllm package") and "\n" not in err
    with pytest.raises(EngineUnavailable, match=r"model\.engine: vllm"):  # before any weights load
        Answerer(parse_spec(doc), run_id="r", run_date="2026-01-01", passthrough=pa.schema([]))


def test_actor_builds_the_engine_its_spec_names(tiny_llava: Path, tmp_path: Path):
    """`model.transformers.cache: static` reaches the actor's engine; answers are unchanged."""
    from pipeline.stages.answer import Answerer
    from pipeline.stages.preprocess import Preprocess

    images = sorted(Path("pipeline/assets/images").glob("*.jpg"))[:3]
    rows = [{"id": p.stem, "image": p.read_bytes(), "question": "What is it?"} for p in images]
    answers = {}
    for cache in ("static", "dynamic"):
        spec = parse_spec(
            MINIMAL
            | {
                "model": {
                    "path": str(tiny_llava),
                    "max_new_tokens": 4,
                    "transformers": {"cache": cache},
                },
                "execution": {"gpus_per_actor": 0},
            }
        )
        batch = Preprocess(spec, [])(pa.Table.from_pylist(rows))
        actor = Answerer(spec, run_id="r", run_date="2026-01-01", passthrough=pa.schema([]))
        assert actor.engine.static == (cache == "static")
        out = actor(batch).to_pylist()
        assert [r["status"] for r in out] == ["ok"] * 3
        answers[cache] = [(r["id"], r["answer"], r["new_tokens"]) for r in out]
    assert answers["static"] == answers["dynamic"]
