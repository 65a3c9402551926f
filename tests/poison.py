"""Fault injection for Ray workers, installed in every worker process.

Installed with ``runtime_env={"worker_process_setup_hook": "tests.poison.install"}``, so it
runs in every worker process, where a module-level patch in the test process cannot reach.
It wraps `resprune.answer.answer_batch`:

* a question containing `MARK` kills the process on every attempt (a poison item);
* a question containing `KILL_ONCE` kills it once, while ``$RESPRUNE_FAULTS/kill-once``
  exists (the first process to remove the file dies);
* while ``$RESPRUNE_FAULTS/cuda-after`` exists and holds N, each process answers N batches
  and then raises a CUDA-style error on every call (a poisoned context).
"""

from __future__ import annotations

import os
from pathlib import Path

MARK = "POISON"
KILL_ONCE = "KILLONCE"
CUDA_ERROR = "CUDA error: device-side assert triggered"


def _flag(name: str) -> Path:
    return Path(os.environ.get("RESPRUNE_FAULTS", "/nonexistent")) / name


def install() -> None:
    """Wrap `resprune.answer.answer_batch` with the faults above."""
    import resprune.answer as answer

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
        if _flag("cuda-after").exists():
            calls[0] += 1
            if calls[0] > int(_flag("cuda-after").read_text()):
                raise RuntimeError(CUDA_ERROR)
        return original(vlm, items, **kwargs)

    answer.answer_batch = answer_batch
