"""The shadow sample: model batches answered twice, pruned and unpruned, on the same actor, so
the cost report can measure what pruning saved (DESIGN §4).

Which batches: systematic per actor and batch-size bucket (1, 2-3, 4-7, ...): the first batch
of each bucket an actor answers is drawn, then every ``ceil(1 / fraction)``-th, so any night
with a fraction above zero and one batch is measured, and a small sample is spread over the
night instead of left to chance. Deterministic given the actor's batch order; a rerun (resume)
starts new actors, which draw their own first batches again.
Which pass first: alternated per drawn batch (pruned first, then unpruned first, ...), so a
warm-state bias (caches, allocator growth) lands on both sides equally.
What a twin is: the same items as its pruned batch, answered unpruned as one batch (split only
where the shadow's own budgets say one unpruned batch of them does not fit, as an unpruned job
would split it). A twin is a measurement, never a reason to fail or change production: its
failure is recorded (``shadow_error``), never raised (see `pipeline.stages.answer`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from resprune.items import ItemError, ItemResult

PRUNED_FIRST, TWIN_FIRST = "pruned_first", "twin_first"


def size_bucket(size: int) -> int:
    """The batch-size bucket: the largest power of two <= ``size`` (0 for an empty batch)."""
    return 1 << (size.bit_length() - 1) if size >= 1 else 0


class ShadowSample:
    """One actor's systematic shadow sample and the alternating pass order."""

    def __init__(self, fraction: float):
        self.every = math.ceil(1 / fraction - 1e-9) if fraction > 0 else 0
        self.seen: dict[int, int] = {}  # model batches answered, per batch-size bucket
        self.drawn = 0  # batches drawn so far (the pass order alternates with it)

    def draw(self, size: int) -> str | None:
        """None when a model batch of ``size`` items is not in the sample, else which pass runs
        first (`PRUNED_FIRST` or `TWIN_FIRST`)."""
        bucket = size_bucket(size)
        index = self.seen.get(bucket, 0)
        self.seen[bucket] = index + 1
        if not self.every or index % self.every:
            return None
        self.drawn += 1
        return PRUNED_FIRST if self.drawn % 2 else TWIN_FIRST


@dataclass
class Twin:
    """An unpruned twin: per item its result (or ItemError) and its share of the twin's device
    time; ``error`` says why the whole twin failed (then ``results`` is empty)."""

    seconds: list[float]
    results: list[Any] = field(default_factory=list)
    error: str | None = None


def twin_failure(twin: Twin, pruned_ok: list[bool]) -> str | None:
    """Why the twin cannot be paired with its pruned batch: it raised, or an item it answered
    failed where its pruned answer did not (a partial twin would bias the ratio)."""
    if twin.error is not None:
        return twin.error
    for ok, result in zip(pruned_ok, twin.results, strict=True):
        if ok and isinstance(result, ItemError):
            return f"unpruned {result.cause}: {result.message}"
    return None


def fill_shadow(rows: list[dict[str, Any]], twin: Twin) -> None:
    """Write the twin into its pruned batch's rows (ok rows only: an error row has no pair).

    A failed twin is a failed shadow batch: ``shadow_error`` names why, its time is shadow time
    (never the pruned items' GPU seconds or failed seconds), and it is left out of the ratio.
    """
    pruned_ok = [r["status"] == "ok" for r in rows]
    failure = twin_failure(twin, pruned_ok)
    for k, row in enumerate(rows):
        if not pruned_ok[k]:
            continue
        row.update(shadow=True, shadow_gpu_seconds=twin.seconds[k])
        if failure is not None:
            row["shadow_error"] = failure
            continue
        result: ItemResult = twin.results[k]
        row.update(
            shadow_answer=result.answer,
            shadow_new_tokens=result.new_tokens,
            shadow_prompt_tokens=result.prompt_tokens,
        )
