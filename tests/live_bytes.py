"""Peak bytes of live tensor storages, measured on the CPU: what ``max_memory_allocated``
reports on a GPU, for the memory model's test (`resprune.memory`).

A `TorchDispatchMode` sees every tensor an op returns; each new storage is counted once (by
its data pointer, views and in-place results share it) and uncounted when it is freed (a
weakref finalizer on the storage object, which PyTorch keeps alive as long as any tensor
holds the storage). Storages that existed before the block (weights) never count. Blind spot:
tensors made without an op (``torch.from_numpy``): host arrays, not device memory.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """``peak``: the most bytes held at once by storages allocated inside the block."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}  # data pointer -> bytes
        self.known: set[int] = set()  # pointers alive before the block
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs or {}))[0]
            if isinstance(t, torch.Tensor)
        }
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t.untyped_storage(), before)
        return out

    def _track(self, storage: torch.UntypedStorage, inputs: set[int]) -> None:
        ptr = storage.data_ptr()
        if not ptr or ptr in self.live or ptr in inputs:
            return  # empty, counted already, or an input (in place, a view, weights)
        size = storage.nbytes()
        self.live[ptr] = size
        self.now += size
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._free, ptr)

    def _free(self, ptr: int) -> None:
        self.now -= self.live.pop(ptr, 0)
