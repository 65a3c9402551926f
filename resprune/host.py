"""Crossing between host and device in one place: batched, and never a hidden stream sync.

On CUDA a device-to-host read waits for every kernel queued before it, and so does
PyTorch's blocking host-to-device copy (``tensor.to("cuda")`` from pageable memory, or
``torch.tensor(data, device="cuda")``: a copy, then a stream synchronisation). Selection
therefore keeps its bookkeeping on the host (numpy, from the prepared items) and crosses
here, a fixed number of times per batch rather than per item:

* `to_host` reads any number of tensors with one wait (asynchronous copies into pinned
  memory, then one stream synchronisation) and returns numpy arrays;
* `to_device` copies a host array in from pinned memory without blocking the stream.

Host-side code reads host tensors with ``.numpy()``, which raises on a device tensor, so a
device read cannot hide there. ``LISTENERS`` are told of each crossing with its device-side
tensors (the tests count stream syncs with them, `tests/syncs.py`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

# called with ("to_host", the tensors read) before a read, ("to_device", (the copy,)) after
LISTENERS: list[Callable[[str, tuple[torch.Tensor, ...]], None]] = []
_NUMPY = torch.Tensor.numpy  # the method itself: a test may wrap Tensor.numpy to count reads
_HALF = (torch.bfloat16, torch.float16)


def to_host(*tensors: torch.Tensor) -> list[np.ndarray]:
    """``tensors`` as numpy arrays, read with one stream wait (none for host tensors)."""
    tensors = tuple(t.detach() for t in tensors)
    for listener in LISTENERS:
        listener("to_host", tensors)
    tensors = tuple(t.float() if t.dtype in _HALF else t for t in tensors)
    devices = {t.device for t in tensors if t.device.type != "cpu"}
    copies = [t.to("cpu", non_blocking=True) if t.device in devices else t for t in tensors]
    for device in devices:
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
    # host tensors are copied too: the arrays never alias device-side memory (on the CPU the
    # "device" is the host, and a later in-place op must not reach back into them)
    return [_NUMPY(c).copy() if c is t else _NUMPY(c) for c, t in zip(copies, tensors, strict=True)]


def to_device(array: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host array on ``device``: from pinned memory, without blocking the stream."""
    tensor = array
    if isinstance(array, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    else:
        tensor = tensor.to(device, copy=True)  # never the caller's buffer, as on CUDA
    for listener in LISTENERS:
        listener("to_device", (tensor,))
    return tensor
