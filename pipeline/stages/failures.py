"""What the model actor does when answering fails: item errors, a broken model, a dead
process (quarantine) and systemic faults (the actor exits so Ray restarts it)."""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

import ray

from pipeline import faults
from pipeline.io.storage import redact
from resprune.items import ItemError

ERROR_STREAK = 8  # consecutive items the model raised for: the model, not the items, is broken


class ErrorStreak:
    """Counts items the model raised for alone; ERROR_STREAK in a row is systemic."""

    def __init__(self) -> None:
        self.count = 0

    def ok(self) -> None:
        """A batch answered: the streak is broken."""
        self.count = 0

    def model_error(self, exc: Exception) -> ItemError:
        """The item's error row, or a SystemicFault when the model fails every item."""
        self.count += 1
        message = f"{type(exc).__name__}: {exc}"
        if self.count >= ERROR_STREAK:
            raise faults.SystemicFault(
                f"the model raised for {ERROR_STREAK} items in a row, last: {message}"
            ) from exc
        return ItemError("model_error", message)


def exit_actor(ledger: Any, ids: list[str], cause: str) -> NoReturn:
    """Leave the process so Ray restarts the actor (bounded) and retries the batch."""
    line = redact(cause.strip().splitlines()[0] if cause.strip() else cause)
    print(f"model actor exits on a systemic fault: {line}", file=sys.stderr, flush=True)
    if ledger is not None:
        ray.get(ledger.systemic_exit.remote(ids, line))
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
