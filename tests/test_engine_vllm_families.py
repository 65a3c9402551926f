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

from tests.vllm_helpers import NEW_TOKENS, reference, vllm_family

pytestmark = pytest.mark.vllm
KEEPS = [8, 20, 0.5, 1.0]  # 3 images of 3 sizes x 4 budgets: 12 requests


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> dict:
    return vllm_family("qwen3_vl", tmp_path_factory.mktemp("q3"), 2048)


@pytest.fixture(scope="module")
def internvl(tmp_path_factory) -> dict:
    return vllm_family("internvl", tmp_path_factory.mktemp("ivl"), 2048)


@pytest.mark.parametrize("policy", ["original", "contiguous"])
def test_greedy_ids_equal_transformers_in_one_mixed_batch(qwen3, policy):
    plans, expected = reference(qwen3, KEEPS, policy)
    assert len(plans) == 12 and len({int(p.features.shape[0]) for p in plans}) >= 4
    assert all(p.side is not None and p.side.shape[:2] == (len(p.features), 2) for p in plans)
    got = qwen3["engine"].generate(plans, NEW_TOKENS)
    assert [g.token_ids for g in got] == expected


def test_deepstack_rows_reach_vllm(qwen3):
    """The DeepStack rows decide answers here: zeroing them changes some request's ids."""
    plans, expected = reference(qwen3, KEEPS, "original")
    flat = [dataclasses.replace(p, side=torch.zeros_like(p.side)) for p in plans]
    got = qwen3["engine"].generate(flat, NEW_TOKENS)
    assert [g.token_ids for g in got] != expected


def test_internvl_greedy_ids_equal_transformers_in_one_mixed_batch(internvl):
    """12 requests of 1 to 3 tiles (the thumbnail included) and 4+ kept counts in one call;
    vLLM wraps each kept run in its own <img> ... </img>, as our prompts had it."""
    plans, expected = reference(internvl, KEEPS, "contiguous")
    tiles = {it.pixel_values.shape[0] for it in internvl["items"]}
    assert len(tiles) >= 2 and len({int(p.features.shape[0]) for p in plans}) >= 4
    assert len({tuple(e) for e in expected}) >= 6  # the tiny model's answers differ
    got = internvl["engine"].generate(plans, NEW_TOKENS)
    assert [g.token_ids for g in got] == expected
