"""Fault injection for Ray workers, installed in every worker process.

Installed with ``runtime_env={"worker_process_setup_hook": "tests.poison.install"}``, so it
runs in every worker process, where a module-level patch in the test process cannot reach.
It wraps `resprune.answer.answer_batch`:

* a question containing `MARK` kills the process on every attempt (a poison item);
* a question containing `KILL_ONCE` kills it once, while ``$RESPRUNE_FAULTS/kill-once``
  exists (the first process to remove the file dies);
* while ``$RESPRUNE_FAULTS/cuda-after`` exists and holds N, each process answers N batches
  and then raises a CUDA-style error on every call (a poisoned context);
* while ``$RESPRUNE_FAULTS/slow`` exists and holds S, each batch takes S seconds more (a
  run long enough to lose a node in);
* while ``$RESPRUNE_FAULTS/refuse`` exists, every item comes back refused as vLLM's enqueue
  refuses it (a plugin or version mismatch);
* ``$RESPRUNE_FAULTS/host-oom-once``: the first batch to remove it raises a bare
  ``MemoryError`` (the host's allocator).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

MARK = "POISON"
KILL_ONCE = "KILLONCE"
CUDA_ERROR = "CUDA error: device-side assert triggered"


def _flag(name: str) -> Path:
    return Path(os.environ.get("RESPRUNE_FAULTS", "/nonexistent")) / name


def _take(name: str) -> bool:
    """Remove the flag file; True for the one process that did."""
    try:
        _flag(name).unlink()
    except FileNotFoundError:
        return False
    return True


def install() -> None:
    """Wrap `resprune.answer.answer_batch` with the faults above."""
    import resprune.answer as answer
    from resprune.engines.vllm_engine import REFUSED
    from resprune.items import ItemError

    original = answer.answer_batch
    calls = [0]

    def answer_batch(vlm, items, **kwargs):
        questions = [item.question for item in items]
        if any(MARK in q for q in questions):
            os._exit(1)  # as a segfault or a CUDA illegal-memory access would
        if any(KILL_ONCE in q for q in questions):
            try:
                _flag("kill-once").unlink()
                os._exit(1)
            except FileNotFoundError:
                pass
        if _flag("slow").exists():
            time.sleep(float(_flag("slow").read_text()))
        if _flag("refuse").exists():
            return [ItemError("model_error", f"{REFUSED}: plugin mismatch") for _ in items]
        if _take("host-oom-once"):
            raise MemoryError()
        if _flag("cuda-after").exists():
            calls[0] += 1
            if calls[0] > int(_flag("cuda-after").read_text()):
                raise RuntimeError(CUDA_ERROR)
        return original(vlm, items, **kwargs)

    answer.answer_batch = answer_batch
