"""Count, on the CPU, the operations that would stall a CUDA stream.

On a GPU, an op whose output size or Python value depends on device data makes the host wait
for every kernel queued before it: reading a scalar (``.item()``, ``int(t)``, ``bool(t)``:
``aten._local_scalar_dense`` / ``aten.item`` / ``aten.is_nonzero``), ``nonzero`` and what
calls it (boolean-mask indexing, ``masked_select``, ``unique``, ``repeat_interleave``
without ``output_size``), and reading a tensor on the host (``.tolist()``, ``.numpy()``,
``.cpu()``, ``.to("cpu")`` / ``.to(device="cpu")``, ``resprune.host.to_host``). On the CPU
those copies are no-ops that never reach the dispatcher, so the Tensor methods are wrapped:
a copy of a tracked tensor counts once and returns an untracked host copy (reading it
further, e.g. ``.cpu().tolist()``, is host work, as on a GPU). As every tensor is a host
tensor on the CPU, `count_syncs` tracks which ones would be on the device: the model's
parameters and buffers, what ``resprune.host.to_device`` copies in, and everything computed
from them (by storage, so views and in-place writes follow). Only ops and reads touching
such a tensor count. Host bookkeeping (numpy, CPU tensors built from the prepared items)
does not stall a stream and is not counted. Blind spots: ``.to(torch.device("cpu"))`` (on
the CPU, the same object as a tracked tensor's own device), ``copy_`` into a host buffer,
and a tensor made on the device from nothing (``torch.zeros(n, device=...)``) read before
anything device-side flows into it.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from resprune import host

SYNC_OPS = {
    "aten._local_scalar_dense",
    "aten.item",  # dispatched as such under inference_mode (else it decomposes to the above)
    "aten.nonzero",
    "aten.is_nonzero",
    "aten._unique",
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
    "aten.masked_select",
    "aten.equal",
    "aten._assert_async",
}
_MASK_INDEXED = {"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"}


def _storage_pointer(t: torch.Tensor) -> int | None:
    """Where ``t``'s storage lives; None for tensors without one (vmap's batched tensors, as
    in transformers' mask functions: never a host read of their own)."""
    try:
        return t.untyped_storage().data_ptr()
    except (NotImplementedError, RuntimeError):
        return None


class SyncCounter(TorchDispatchMode):
    """Counts stalling ops and reads by name (``syncs``) and copies in (``to_device``)."""

    def __init__(self, roots: list[torch.Tensor], everything: bool = False):
        super().__init__()
        self.everything = everything  # count host tensors too (what a plain op count sees)
        self.syncs: Counter[str] = Counter()
        self.to_device = 0
        self.paused = 0
        self.device: dict[int, torch.Tensor] = {}  # storage pointer -> a tensor holding it
        self.host_copy = 0  # inside a device-to-host copy: its output is a host tensor
        for t in roots:
            self.mark(t)

    def mark(self, t: torch.Tensor) -> None:
        """Track ``t`` as a device tensor (held until the count ends: no pointer reuse)."""
        if self.host_copy:
            return
        if isinstance(t, torch.Tensor) and t.numel() and t.device.type != "meta":
            pointer = _storage_pointer(t)
            if pointer is not None:
                self.device[pointer] = t

    def on_device(self, t) -> bool:
        return (
            isinstance(t, torch.Tensor)
            and (self.everything or t.numel() > 0)
            and (self.everything or _storage_pointer(t) in self.device)
        )

    def count(self, name: str) -> None:
        if not self.paused:
            self.syncs[name] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs, _ = tree_flatten((args, kwargs))
        if any(self.on_device(t) for t in inputs):
            name = func.overloadpacket._qualified_op_name.replace("::", ".")
            if name in SYNC_OPS:
                self.count(name)
            elif name in _MASK_INDEXED and _bool_index(args):
                self.count(f"{name} (bool mask)")
            elif name == "aten.repeat_interleave" and "output_size" not in kwargs:
                self.count(name)
            for t in tree_flatten(out)[0]:
                self.mark(t)
        return out

    @property
    def total(self) -> int:
        return sum(self.syncs.values())

    @contextmanager
    def pause(self):
        """Stop counting inside (e.g. transformers' own decode loop); tracking goes on."""
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1


def _to_host(args, kwargs) -> bool:
    """Whether ``Tensor.to(*args, **kwargs)`` names the host: the string "cpu" (a
    ``torch.device`` is not taken as one: on the CPU ``x.to(y.device)`` says "y's device")."""
    device = kwargs.get("device")
    for a in args:
        if isinstance(a, str | torch.device):
            device = a
    return isinstance(device, str) and torch.device(device).type == "cpu"


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(
        isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)
        for t in (indices or ())
    )


@contextmanager
def count_syncs(model: torch.nn.Module | None = None, *, everything: bool = False):
    """Count, inside the block, stalling ops and host reads of device tensors (``model``'s
    parameters and buffers, `resprune.host.to_device` copies, and what flows from them);
    ``everything``: of every tensor, host ones included (an upper bound)."""
    roots = [] if model is None else [*model.parameters(), *model.buffers()]
    counter = SyncCounter(roots, everything)
    patched = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy", "cpu", "to")}

    def reading(name):
        method = patched[name]

        def read(self, *args, **kwargs):
            # .numpy() raises on a CUDA tensor: only a tracked one is a (would-be) read
            tracked = counter.on_device(self) and not (counter.everything and name == "numpy")
            if name in ("cpu", "to"):
                return copy_out(method, name, tracked, self, args, kwargs)
            if tracked:
                counter.count(f"Tensor.{name}")
            return method(self, *args, **kwargs)

        return read

    def copy_out(method, name, tracked, tensor, args, kwargs):
        """.cpu() / .to(cpu) of a tracked tensor: one read, and an untracked host copy."""
        if not tracked or (name == "to" and not _to_host(args, kwargs)):
            return method(tensor, *args, **kwargs)
        counter.count("Tensor.cpu" if name == "cpu" else "Tensor.to(cpu)")
        counter.host_copy += 1
        try:
            return method(tensor, *args, **kwargs).clone()
        finally:
            counter.host_copy -= 1

    def crossing(kind, tensors):
        if kind == "to_host":
            if any(counter.on_device(t) for t in tensors):
                counter.count("to_host")
        else:
            counter.to_device += not counter.paused
            for t in tensors:
                counter.mark(t)

    for name in patched:
        setattr(torch.Tensor, name, reading(name))
    host.LISTENERS.append(crossing)
    try:
        with counter:
            yield counter
    finally:
        host.LISTENERS.remove(crossing)
        for name, method in patched.items():
            setattr(torch.Tensor, name, method)


def count_answer_batch_syncs(vlm, items, *, everything: bool = False, **kwargs) -> SyncCounter:
    """The syncs of one `resprune.answer.answer_batch` (transformers' own decode loop not
    counted: its stopping check is one read per step, whatever the batch)."""
    from resprune.answer import answer_batch

    generate = vlm.model.generate
    with count_syncs(vlm.model, everything=everything) as counter:

        def uncounted(*args, **kw):
            with counter.pause():
                return generate(*args, **kw)

        vlm.model.generate = uncounted
        try:
            answer_batch(vlm, items, **kwargs)
        finally:
            vlm.model.generate = generate
    return counter
