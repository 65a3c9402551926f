"""What the model actor does when answering fails: item errors, a broken model, a dead
process (quarantine) and systemic faults (the actor exits so Ray restarts it, within the
run's budget of such exits)."""

from __future__ import annotations

import os
import sys
from collections import deque
from typing import Any, NoReturn

import ray

from pipeline import faults
from pipeline.io.storage import redact
from resprune.items import ItemError

WINDOW_ITEMS = 100  # the recent items an actor judges its model's errors over
WINDOW_ERRORS = 8  # model errors among them: the model, not the items, is broken
MODEL_CAUSES = ("model_error",)  # causes the model (or its engine) gives, not the input


class ErrorWindow:
    """The causes of the last `WINDOW_ITEMS` items this actor answered: `WINDOW_ERRORS` of
    one model cause among them is systemic, whether they came in a row or hit a subset of
    the items (one image size, one kind of prompt) between good batches."""

    def __init__(self) -> None:
        self.recent: deque[str | None] = deque(maxlen=WINDOW_ITEMS)

    def observe(self, results: list[Any]) -> None:
        """Record a batch's results (ItemError or answers); raise SystemicFault when every
        item of a batch of several has one model cause (an engine refusing every request),
        or when one model cause reaches `WINDOW_ERRORS` in the window."""
        causes = {r.cause if isinstance(r, ItemError) else None for r in results}
        if len(results) > 1 and len(causes) == 1 and causes <= set(MODEL_CAUSES):
            raise faults.SystemicFault(
                f"the model failed every item of a batch of {len(results)} "
                f"({results[0].cause}): {results[0].message}"
            )
        for result in results:
            error = result if isinstance(result, ItemError) else None
            cause = error.cause if error is not None and error.cause in MODEL_CAUSES else None
            self.recent.append(cause)
            if cause is not None and self.recent.count(cause) >= WINDOW_ERRORS:
                raise faults.SystemicFault(
                    f"the model failed {self.recent.count(cause)} of the last "
                    f"{len(self.recent)} items ({cause}), last: {error.message}"
                )

    def model_error(self, exc: Exception) -> ItemError:
        """The item's error row, or a SystemicFault when the model fails too many items."""
        error = ItemError("model_error", f"{type(exc).__name__}: {exc}")
        try:
            self.observe([error])
        except faults.SystemicFault as fault:
            raise fault from exc
        return error


def exit_actor(ledger: Any, ids: list[str], cause: str) -> NoReturn:
    """Leave the process so Ray restarts the actor and retries the batch; once the run's
    budget of systemic exits (``execution.max_task_retries``) is spent, raise instead, so
    the run ends with one line naming the cause."""
    line = redact(cause.strip().splitlines()[0] if cause.strip() else cause)
    spent = None
    if ledger is not None:
        spent = ray.get(ledger.systemic_exit.remote(ids, line))
    if spent:
        raise faults.SystemicFault(spent)
    print(f"model actor exits on a systemic fault: {line}", file=sys.stderr, flush=True)
    os._exit(1)


def quarantine(row: dict[str, Any]) -> None:
    """The row of an item whose process died while it was answered alone."""
    msg = (
        f"id={row['id']}: crashed_worker: the model process died while answering this "
        "item alone; quarantined instead of retried"
    )
    row.update(status="error", error_cause="crashed_worker", error=msg)


def free_device_memory() -> None:
    """Release cached blocks before retrying smaller (after an out-of-memory, say)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
