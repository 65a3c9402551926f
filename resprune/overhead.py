"""Compile and capture time: billed overhead, never model time.

A compiled or captured step pays its compile (dynamo, inductor) and its CUDA-graph capture
once per shape, on the first batch of that shape. That time is the actor's (it is billed)
but not the items': code that warms a shape up does it inside `counted`, and whoever times
model work subtracts what `seconds()` grew by during its window (`resprune.answer` per
stage, `pipeline.stages.answer` per batch), then reports the overhead on its own line.

Lazy library setup is one-time work too: the first matrix product, convolution and attention
on a device create cuBLAS / cuDNN handles and workspaces (oneDNN primitives on the CPU).
`warm_libraries` does them once per (device, dtype) on tiny synthetic tensors, counted, and
`resprune.answer.answer_batch` calls it before it starts its clock.

Process-wide: one actor process answers one batch at a time. Windows nest (an outer window
counts its inner ones once; labels are kept per window). Non-goal: attributing overhead to items.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

_total = 0.0
_depth = 0
_by_label: dict[str, float] = {}
_warmed: set[tuple[str, torch.dtype]] = set()


def seconds() -> float:
    """Compile and capture seconds spent in this process so far."""
    return _total


def by_label() -> dict[str, float]:
    """Seconds per warmed-up shape (its label, e.g. ``decode 8x640``), in first-use order."""
    return dict(_by_label)


@dataclass
class Span:
    """One counted window's own seconds (set when it closes)."""

    seconds: float = 0.0


@contextmanager
def counted(label: str, device: torch.device | None = None) -> Iterator[Span]:
    """Count the block's wall time (device synchronised at both ends) as overhead."""
    global _total, _depth
    span = Span()
    _sync(device)
    start = time.perf_counter()
    _depth += 1
    try:
        yield span
    finally:
        _depth -= 1
        _sync(device)
        span.seconds = time.perf_counter() - start
        _by_label[label] = _by_label.get(label, 0.0) + span.seconds
        if not _depth:  # an inner window is already inside its outer one
            _total += span.seconds


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_libraries(device: torch.device, dtype: torch.dtype) -> None:
    """The lazy setup of the device's libraries for ``dtype`` (matrix products, convolution,
    attention), once per process, on tiny synthetic tensors, counted as overhead."""
    key = (str(device), dtype)
    if key in _warmed:
        return
    _warmed.add(key)
    functional = torch.nn.functional
    with counted(f"library setup {device} {dtype}", device), torch.inference_mode():
        x = torch.ones(1, 4, 8, 8, device=device, dtype=dtype)
        x[0, 0] @ x[0, 0]  # cuBLAS handle and workspace
        torch.bmm(x[0], x[0])
        functional.conv2d(x, x[:, :, :2, :2], stride=2)  # cuDNN (the towers' patch embedding)
        functional.scaled_dot_product_attention(x, x, x)
