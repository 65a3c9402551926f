"""Fault injection for Ray workers: a question containing POISON kills the model process.

Installed with ``runtime_env={"worker_process_setup_hook": "tests.poison.install"}``, so it
runs in every worker process, where a module-level patch in the test process cannot reach.
"""

from __future__ import annotations

import os

MARK = "POISON"


def install() -> None:
    """Wrap `resprune.answer.answer_batch` to `os._exit` on a batch holding a poison item."""
    import resprune.answer as answer

    original = answer.answer_batch

    def answer_batch(vlm, items, **kwargs):
        if any(MARK in item.question for item in items):
            os._exit(1)  # as a segfault or a CUDA illegal-memory access would
        return original(vlm, items, **kwargs)

    answer.answer_batch = answer_batch
