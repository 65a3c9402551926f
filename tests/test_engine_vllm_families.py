"""Qwen3-VL and InternVL through vLLM against the transformers engine: greedy ids token for
token, with each Qwen3-VL request's kept DeepStack rows and M-RoPE positions
(`resprune.engines.vllm_qwen3`), and InternVL's kept tokens of every tile
(`resprune.engines.vllm_models.PrunedInternVL`).

Runs in the vLLM environment (`make test-vllm`); skipped where vLLM is not installed. One
engine per family for the module (a start costs tens of seconds on CPU); head_dim 32 (vLLM's
CPU attention has no kernel for smaller heads).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("vllm")

from resprune.answer import answer_batch
from resprune.engines import build_engine
from resprune.engines.hf import TransformersEngine
from resprune.items import ItemResult
from resprune.loading import load_preprocessor, load_vlm
from resprune.pruners import build_pruner
from resprune.tiny import build_tiny_checkpoint
from tests.vlm_helpers import prepared

pytestmark = pytest.mark.vllm
NEW_TOKENS = 8
KEEPS = [8, 20, 0.5, 1.0]  # 3 images of 3 sizes x 4 budgets: 12 requests


class Recording(TransformersEngine):
    """The reference engine, keeping every plan it was given."""

    def __init__(self, vlm):
        super().__init__(vlm)
        self.plans = []

    def generate(self, plans, max_new_tokens):
        self.plans.extend(plans)
        return super().generate(plans, max_new_tokens)


def _family(family: str, folder) -> dict:
    path = str(build_tiny_checkpoint(family, folder, heads=2, kv_heads=1))
    items = prepared(load_preprocessor(path))
    engine = build_engine("vllm", load_vlm(path), max_model_len=2048)
    return {"path": path, "ref": load_vlm(path), "items": items, "engine": engine}


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> dict:
    return _family("qwen3_vl", tmp_path_factory.mktemp("q3"))


@pytest.fixture(scope="module")
def internvl(tmp_path_factory) -> dict:
    return _family("internvl", tmp_path_factory.mktemp("ivl"))


def reference(fam: dict, policy: str) -> tuple[list, list]:
    """Plans and transformers' greedy ids for every item at every keep."""
    engine, ids = Recording(fam["ref"]), []
    for keep in KEEPS:
        results = answer_batch(
            fam["ref"],
            fam["items"],
            pruner=build_pruner("resprune"),
            keep=keep,
            max_new_tokens=NEW_TOKENS,
            position_policy=policy,
            engine=engine,
        )
        assert all(isinstance(r, ItemResult) for r in results), results
        ids += [r.answer_ids for r in results]
    return engine.plans, ids


@pytest.mark.parametrize("policy", ["original", "contiguous"])
def test_greedy_ids_equal_transformers_in_one_mixed_batch(qwen3, policy):
    plans, expected = reference(qwen3, policy)
    assert len(plans) == 12 and len({int(p.features.shape[0]) for p in plans}) >= 4
    assert all(p.side is not None and p.side.shape[:2] == (len(p.features), 2) for p in plans)
    got = qwen3["engine"].generate(plans, NEW_TOKENS)
    assert [g.token_ids for g in got] == expected


def test_deepstack_rows_reach_vllm(qwen3):
    """The DeepStack rows decide answers here: zeroing them changes some request's ids."""
    plans, expected = reference(qwen3, "original")
    flat = [dataclasses.replace(p, side=torch.zeros_like(p.side)) for p in plans]
    got = qwen3["engine"].generate(flat, NEW_TOKENS)
    assert [g.token_ids for g in got] != expected


def test_internvl_greedy_ids_equal_transformers_in_one_mixed_batch(internvl):
    """12 requests of 1 to 3 tiles (the thumbnail included) and 4+ kept counts in one call;
    vLLM wraps each kept run in its own <img> ... </img>, as our prompts had it."""
    plans, expected = reference(internvl, "contiguous")
    tiles = {it.pixel_values.shape[0] for it in internvl["items"]}
    assert len(tiles) >= 2 and len({int(p.features.shape[0]) for p in plans}) >= 4
    assert len({tuple(e) for e in expected}) >= 6  # the tiny model's answers differ
    got = internvl["engine"].generate(plans, NEW_TOKENS)
    assert [g.token_ids for g in got] == expected
