"""The shadow sample: seeded model batches answered twice, pruned and unpruned, on the same
actor, so the cost report can measure what pruning saved (DESIGN §4)."""

from __future__ import annotations

import hashlib
from typing import Any

from resprune.items import ItemResult


def shadow_batch(ids: list[str], fraction: float, seed: int) -> bool:
    """Seeded membership of a model batch (by its ids) in the shadow sample."""
    if fraction <= 0 or not ids:
        return False
    key = "\0".join([str(seed), *sorted(ids)]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64 < fraction


def fill_shadow(rows: list[dict[str, Any]], twins: list[Any]) -> None:
    """Write the unpruned twins into their rows; a partial twin (one item failed) would bias
    the ratio, so then every twin's time is failed work instead."""
    paired = all(isinstance(t.result, ItemResult) for t in twins)
    for row, twin in zip(rows, twins, strict=True):
        if not paired:
            row["failed_gpu_seconds"] += twin.seconds + twin.failed_s
            continue
        result = twin.result
        row.update(
            shadow=True,
            shadow_answer=result.answer,
            shadow_gpu_seconds=twin.seconds,
            shadow_new_tokens=result.new_tokens,
            shadow_prompt_tokens=result.prompt_tokens,
        )
        row["failed_gpu_seconds"] += twin.failed_s
