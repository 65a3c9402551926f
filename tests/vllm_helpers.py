"""Shared helpers for the vLLM engine tests: tiny families behind vLLM, and the transformers
reference they are compared with."""

from __future__ import annotations

from resprune.answer import answer_batch
from resprune.engines import build_engine
from resprune.engines.hf import TransformersEngine
from resprune.items import ItemResult
from resprune.loading import load_preprocessor, load_vlm
from resprune.pruners import build_pruner
from resprune.tiny import build_tiny_checkpoint
from tests.vlm_helpers import prepared

NEW_TOKENS = 8
HEADS = {"heads": 2, "kv_heads": 1}  # head_dim 32


class Recording(TransformersEngine):
    """The reference engine, keeping every plan it was given."""

    def __init__(self, vlm):
        super().__init__(vlm)
        self.plans = []

    def generate(self, plans, max_new_tokens):
        self.plans.extend(plans)
        return super().generate(plans, max_new_tokens)


def vllm_family(family: str, folder, max_model_len: int) -> dict:
    """A tiny ``family`` checkpoint: its path, the reference VLM, prepared items, the vLLM
    engine."""
    path = str(build_tiny_checkpoint(family, folder, **HEADS))
    items = prepared(load_preprocessor(path))
    engine = build_engine("vllm", load_vlm(path), max_model_len=max_model_len)
    return {"path": path, "ref": load_vlm(path), "items": items, "engine": engine}


def reference(fam: dict, keeps: list, policy: str = "contiguous") -> tuple[list, list]:
    """Plans and transformers' greedy ids for every item at every keep."""
    engine, ids = Recording(fam["ref"]), []
    for keep in keeps:
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
