"""Packing a model actor's items into batches that fit: an item cap, an LLM-token cap (set,
or learnt from an out-of-memory) and, with ``max_batch_tokens: auto`` on a GPU, the device
bytes `resprune.memory.BatchMemory` estimates for the whole batch."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from pipeline.spec import JobSpec
from resprune.items import PreparedItem
from resprune.keep import EnergyKeep

SHRINK = 0.75  # after an out-of-memory, budgets drop to this share of what the batch needed


def pack(
    costs: list[int],
    *,
    budget: int | None,
    max_items: int,
    grow: Callable[[Any, int], tuple[Any, bool]] | None = None,
) -> list[list[int]]:
    """Group item indices (longest first) into batches under a token budget and a size cap.

    ``grow(state, i)``, when given, adds item i to a batch's running state (None: empty) and
    says whether the batch still fits (e.g. in device memory); a lone item always goes.
    """
    order = sorted(range(len(costs)), key=lambda i: -costs[i])
    batches: list[list[int]] = []
    current: list[int] = []
    used, state = 0, None
    for i in order:
        if current:
            grown, fits = grow(state, i) if grow else (None, True)
            over = budget is not None and used + costs[i] > budget
            if over or len(current) >= max_items or not fits:
                batches.append(current)
                current, used, state = [], 0, None
        if not current:
            grown = grow(None, i)[0] if grow else None
        current.append(i)
        used += costs[i]
        state = grown
    if current:
        batches.append(current)
    return batches


class Packer:
    """One actor's batch budgets; an out-of-memory lowers them for its later batches. The
    shadow twins have a packer of their own (``role``), so their out-of-memory never lowers
    production's budgets."""

    def __init__(self, spec: JobSpec, vlm: Any, engine: Any, role: str = "model batches"):
        from resprune.memory import BatchMemory, device_budget, resolve_batch_tokens

        self.spec, self.role = spec, role
        self.image_token_id = int(vlm.model.config.image_token_id)
        tokens = spec.execution.max_batch_tokens  # vLLM sizes its own batches from memory
        auto_vllm = tokens == "auto" and spec.model.engine == "vllm"
        self.batch_tokens = None if auto_vllm else resolve_batch_tokens(tokens, vlm.device)
        self.memory, self.budget_bytes = None, None  # auto on a GPU: batches by device bytes
        if tokens == "auto" and not auto_vllm and vlm.device.type == "cuda":
            self.memory = BatchMemory(
                vlm.model.config,
                vlm.model.dtype,
                max_new_tokens=spec.model.max_new_tokens,
                static_cache=getattr(engine, "static", False),
                bucketed=getattr(engine, "bucket", False),
            )
            share = min(1.0, spec.execution.gpus_per_actor)
            self.budget_bytes = device_budget(vlm.device, share)
        self.oom_tokens: int | None = None  # the token cap an out-of-memory taught this actor

    def cost(self, item: PreparedItem, pruner: Any, keep: Any) -> int:
        """LLM tokens the item will hold: pruned prompt + new tokens. Packing happens before
        selection, so an energy budget counts its max (an upper bound: batches never overrun
        the token budget, and hold fewer items than they could when images keep less)."""
        from resprune.adaptive import max_kept

        n = len(item.input_ids)
        visual = int((item.input_ids == self.image_token_id).sum())
        kept = visual if pruner.name == "none" else max_kept(keep, visual)
        return n - visual + kept + self.spec.model.max_new_tokens

    def batches(self, items: list[PreparedItem], pruner: Any, keep: Any) -> list[list[int]]:
        """Item indices in batches under every budget."""
        costs = [self.cost(it, pruner, keep) for it in items]
        caps = [c for c in (self.batch_tokens, self.oom_tokens) if c is not None]
        grow = None
        if self.memory is not None:
            from resprune.memory import BatchShape

            feet = self._footprints(items, costs, pruner, keep)

            def grow(state, i):
                shape = self.memory.add(state or BatchShape(), feet[i])
                return shape, self.memory.bytes(shape) <= self.budget_bytes

        max_items = self.spec.execution.batch_size
        return pack(costs, budget=min(caps, default=None), max_items=max_items, grow=grow)

    def ran(self, items: list[PreparedItem], pruner: Any, keep: Any) -> None:
        """A batch of ``items`` ran: the KV pool and graph buffers it grew stay at their size,
        so the memory model charges them to every later batch (`BatchMemory.ran`)."""
        if self.memory is None:
            return
        from resprune.memory import BatchShape

        costs = [self.cost(it, pruner, keep) for it in items]
        shape = BatchShape()
        for foot in self._footprints(items, costs, pruner, keep):
            shape = self.memory.add(shape, foot)
        self.memory.ran(shape)

    def shrink(self, items: list[PreparedItem], pruner: Any, keep: Any) -> None:
        """After an out-of-memory with these items: budgets below what they needed, kept for
        the actor's later batches (each out-of-memory takes off another SHRINK share)."""
        costs = [self.cost(it, pruner, keep) for it in items]
        self.oom_tokens = max(1, int(SHRINK * sum(costs)))
        line = f"out of memory with {len(items)} items ({sum(costs)} LLM tokens)"
        if self.memory is not None:
            from resprune.memory import BatchShape

            shape = BatchShape()
            for foot in self._footprints(items, costs, pruner, keep):
                shape = self.memory.add(shape, foot)
            self.budget_bytes = int(SHRINK * min(self.budget_bytes, self.memory.bytes(shape)))
            line += f"; batches now within {self.budget_bytes / 2**30:.2f} GiB"
        line += f" and {self.oom_tokens} LLM tokens"
        print(f"model actor: {line} ({self.role})", file=sys.stderr, flush=True)

    def _footprints(self, items, costs, pruner, keep) -> list[Any]:
        selects = pruner.name == "resprune"  # the one pruner that holds a Gram per batch
        keep = keep.max if isinstance(keep, EnergyKeep) else keep  # selection runs to max
        anyres = self.spec.pruning.anyres
        return [
            self.memory.item(it, cost=c, keep=keep if selects else None, anyres=anyres)
            for it, c in zip(items, costs, strict=True)
        ]
