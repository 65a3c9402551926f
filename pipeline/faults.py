"""The one place that decides what a failure is: an item's, a transient one, or the job's.

* **item** faults belong to one row (bad image, bad question, prompt too long, the model
  raising for that item alone): the row is committed with ``status="error"`` and one of the
  documented `ITEM_CAUSES`. A rerun does not retry it.
* **transient** faults belong to the infrastructure (S3/HTTP 5xx, throttling such as
  ``SlowDown``, timeouts, connection resets): retried with exponential backoff and a bound
  (`retry`); a row still failing is marked `DEFERRED` and never committed, so the run ends
  unfinished (exit 1) and a rerun does it again.
* **systemic** faults poison the model process (CUDA errors that leave the context unusable,
  a generation engine that died or refuses every request of a batch: vLLM's
  ``EngineDeadError`` or an engine-core failure, raised as `resprune.engines.EngineDead`; out
  of device or host memory with one item; the model failing too many recent items): the actor
  exits at once so Ray restarts it (bounded by ``execution.max_task_retries`` per run); a run
  that cannot progress fails with one line naming the cause and leaves its unanswered rows
  for the rerun. They are never error rows. Neither is a lost node: its model actor restarts
  elsewhere and its batches are answered again (`pipeline.job.watchdog`).

Non-goals: retrying whole runs (a rerun of the same spec resumes) and classifying by
exception class alone (pyarrow raises ``OSError`` for both missing keys and 503s).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

from resprune.engines.base import engine_dead

T = TypeVar("T")

ITEM, TRANSIENT, SYSTEMIC = "item", "transient", "systemic"
DEFERRED = "deferred"  # internal row status: a transient fault outlived its retries

ITEM_CAUSES: dict[str, str] = {
    "empty": "the image is null or 0 bytes",
    "too_large_bytes": "the encoded image is above execution.max_image_bytes",
    "undecodable": "the bytes are not an image Pillow can read",
    "truncated": "the image data ends early",
    "bomb_or_too_large": "the decoded image is above execution.max_image_pixels",
    "bad_aspect": "the image is thinner than execution.max_aspect_ratio allows",
    "unsupported_mode": "the pixel mode cannot be converted to RGB",
    "fetch_failed": "the image URI does not exist or refuses access (not a transient fault)",
    "bad_member": "a WebDataset sample's .json or text member is not valid JSON / UTF-8",
    "bad_question": "the question cannot be tokenized",
    "bad_image": "the model's processor rejected the image",
    "prompt_too_long": "the prompt (plus new tokens) does not fit the model's context",
    "image_tokens": "the prompt's image tokens do not match the image features",
    "preprocess_error": "an unexpected error in the CPU stage for this item (message names it)",
    "model_error": "the model (or the vLLM engine) raised for or refused this item alone",
    "crashed_worker": "the model process died while answering this item alone (quarantined)",
}

_TRANSIENT_TEXT = (
    "SLOW_DOWN",
    "SlowDown",
    "Throttl",
    "TooManyRequests",
    "RequestTimeout",
    "REQUEST_TIMEOUT",
    "NETWORK_CONNECTION",
    "INTERNAL_FAILURE",
    "SERVICE_UNAVAILABLE",
    "HTTP status 500",
    "HTTP status 502",
    "HTTP status 503",
    "HTTP status 504",
    "curlCode: 28",
    "curlCode: 52",
    "curlCode: 56",
    "Connection reset",
    "Connection aborted",
    "Broken pipe",
    "timed out",
    "Timeout was reached",
    "Remote end closed",
)
_SYSTEMIC_TEXT = (
    "device-side assert",
    "illegal memory access",
    "CUDA error",
    "CUBLAS_STATUS",
    "CUDNN_STATUS",
    "NCCL error",
    "unspecified launch failure",
)
_OOM_TEXT = ("CUDA out of memory", "out of memory")


class TransientFault(RuntimeError):
    """A transient fault that outlived its bounded retries (the row is deferred)."""


class SystemicFault(RuntimeError):
    """A fault of the model process itself; the actor must exit and be restarted."""


def is_oom(exc: BaseException) -> bool:
    """Out of device memory, or of host memory (Python's ``MemoryError``, often with no
    message at all): a fault of the job's sizing, never of an item."""
    if isinstance(exc, MemoryError):
        return True
    name = type(exc).__name__
    return name == "OutOfMemoryError" or any(t in str(exc) for t in _OOM_TEXT)


def classify(exc: BaseException, *, batch_size: int = 1) -> str:
    """ITEM, TRANSIENT or SYSTEMIC for an exception raised while handling ``batch_size`` items.

    Out of memory is systemic only with one item (a bigger batch is split instead).
    """
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, SystemicFault) or engine_dead(exc):
        return SYSTEMIC
    if is_oom(exc):
        return SYSTEMIC if batch_size <= 1 else ITEM
    if any(t in text for t in _SYSTEMIC_TEXT):
        return SYSTEMIC
    if isinstance(exc, TransientFault | ConnectionError | TimeoutError):
        return TRANSIENT
    if isinstance(exc, OSError) and any(t in text for t in _TRANSIENT_TEXT):
        return TRANSIENT
    return ITEM


def retry(
    fn: Callable[[], T], *, what: str, attempts: int = 5, base_s: float = 0.2, max_s: float = 5.0
) -> T:
    """Call ``fn``; retry transient faults with jittered exponential backoff, ``attempts`` in
    all. Other faults propagate at once; a transient one left raises `TransientFault`."""
    for attempt in range(attempts - 1):
        try:
            return fn()
        except Exception as exc:
            if classify(exc) != TRANSIENT:
                raise
            time.sleep(min(max_s, base_s * 2**attempt) * (0.5 + random.random()))
    try:
        return fn()
    except Exception as exc:
        if classify(exc) != TRANSIENT:
            raise
        raise TransientFault(
            f"{what}: still failing after {attempts} attempts: {type(exc).__name__}: {exc}"
        ) from exc
