"""The model stage: one actor holds the VLM and answers prepared rows with the pruner.

Per call: rows that failed on the CPU pass through untouched; the rest are packed into
sub-batches by an LLM-token budget (``execution.max_batch_tokens``: prompt after pruning + new
tokens, so pruned items form proportionally larger batches; ``auto`` on a GPU packs by the
device bytes of each batch instead, vision tower, selector, padded and bucketed KV cache
included, within the actor's share of the GPU, see resprune/memory.py), answered, and timed
on the device (synchronised wall time split over the sub-batch's items; each row names its
batch and its size). A sub-batch that runs out of memory shrinks the actor's budgets to
SHRINK of what it needed (remembered for its later batches) and is answered again in batches
packed under them. Any other sub-batch that raises falls back to one item at a time, so one
item cannot sink its batch. A failed attempt's time is billed as overhead on its items
(``failed_gpu_seconds``), never as model time: ``gpu_seconds`` is each item's share of the
attempt that answered it, so their sum is the time of the successful batches. A systemic
fault (`pipeline.faults`: a CUDA error, out of memory with one item, ``ERROR_STREAK`` items
in a row raising) is never written as an answer: the actor exits so Ray restarts it and
retries the batch, within ``execution.max_task_retries``. The shadow sample is drawn by
batch: a seeded share of the model batches is answered again unpruned, packed under the same
size cap and budgets, right after its pruned pass on the same actor, so the time ratio
compares the main pass's own batches with their unpruned twins (same regime: batch 1 is
memory-bound, full batches are not). The actor reports its start, model shape and busy time
to the run's ledger (side effects are at-least-once; the run's GPU-seconds come from
committed rows instead). A batch whose earlier attempt killed the actor process is answered
one item at a time, and an item that killed it while answered alone is quarantined
(``crashed_worker``) instead of retried: a poison item costs at most three attempts
(``execution.max_task_retries`` >= 2). Compile and capture time (`resprune.overhead`: the
first batch of each shape warms that shape up first, pruned and shadow alike) is left out of
the items' GPU seconds and the busy time; the actor reports it as ``compile_s``, which the run
summary and the cost report show as billed overhead. Non-goal: batching across Ray calls.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, NoReturn

import pyarrow as pa
import ray

from pipeline import faults
from pipeline.io.storage import redact
from pipeline.output.columns import output_schema
from pipeline.spec import JobSpec
from pipeline.stages.preprocess import PREPARED
from resprune.items import ItemError, ItemResult, PreparedItem
from resprune.keep import EnergyKeep

ERROR_STREAK = 8  # consecutive items the model raised for: the model, not the items, is broken
SHRINK = 0.75  # after an out-of-memory, budgets drop to this share of what the batch needed


@dataclass(frozen=True)
class Answered:
    """One item's outcome in a model batch: result (or ItemError) and its device time."""

    result: Any
    seconds: float  # the item's share of its batch's device time (0.0 when it failed)
    batch_id: str
    batch_size: int
    failed_s: float = 0.0  # its share of attempts that raised (batch split, lone failure)


def shadow_batch(ids: list[str], fraction: float, seed: int) -> bool:
    """Seeded membership of a model batch (by its ids) in the shadow sample."""
    if fraction <= 0 or not ids:
        return False
    key = "\0".join([str(seed), *sorted(ids)]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64 < fraction


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


class Answerer:
    """Map prepared rows to output rows (same rows, same order) with the job's model."""

    def __init__(
        self,
        spec: JobSpec,
        *,
        run_id: str,
        run_date: str,
        passthrough: pa.Schema | None,
        ledger: Any = None,
        share: Answerer | None = None,
    ):
        """Load the model and engine, or reuse ``share``'s (`pipeline eval` answers every
        configuration with one model per actor)."""
        import torch

        from resprune.engines import engine_class
        from resprune.loading import load_vlm
        from resprune.memory import BatchMemory, device_budget, resolve_batch_tokens
        from resprune.pruners import build_pruner

        self.started, self.key = time.time(), uuid.uuid4().hex
        self.spec, self.ledger, self.passthrough = spec, ledger, passthrough
        self.const = {
            "run_id": run_id,
            "run_date": run_date,
            "model": spec.model.path,
            "pruner": spec.pruning.method,
            "keep": str(spec.pruning.keep_value),
        }
        engine = engine_class(spec.model.engine)  # not installed: fail before loading weights
        gpu = spec.execution.gpus_per_actor > 0 and torch.cuda.is_available()
        self.device = "cuda" if gpu else "cpu"
        m = spec.model
        self.vlm = (
            share.vlm
            if share
            else load_vlm(
                m.path,
                family=m.family,
                dtype=m.dtype if gpu else "float32",
                device=self.device,
                revision=m.revision,
                trust_remote_code=m.trust_remote_code,
                endpoint_url=spec.storage.endpoint_url,
                attn_implementation=m.attn_implementation,
            )
        )
        options = getattr(m, m.engine).model_dump()  # the engine's own settings block
        self.engine = share.engine if share else engine(self.vlm, **options)
        p = spec.pruning
        self.pruner = build_pruner(
            p.method, alpha=p.alpha, seed=p.seed, relevance_floor=p.relevance_floor
        )
        self.unpruned = build_pruner("none")
        self.image_token_id = int(self.vlm.model.config.image_token_id)
        tokens = spec.execution.max_batch_tokens  # vLLM sizes its own batches from memory
        auto_vllm = tokens == "auto" and m.engine == "vllm"
        self.batch_tokens = (
            None if auto_vllm else resolve_batch_tokens(tokens, self.vlm.model, self.vlm.device)
        )
        self.memory, self.budget_bytes = None, None  # auto on a GPU: batches by device bytes
        if tokens == "auto" and not auto_vllm and self.vlm.device.type == "cuda":
            self.memory = BatchMemory(
                self.vlm.model.config,
                self.vlm.model.dtype,
                max_new_tokens=m.max_new_tokens,
                static_cache=getattr(self.engine, "static", False),
                bucketed=getattr(self.engine, "bucket", False),
            )
            share = min(1.0, spec.execution.gpus_per_actor)
            self.budget_bytes = device_budget(self.vlm.device, share)
        self.oom_tokens: int | None = None  # the token cap an out-of-memory taught this actor
        self.busy_s, self.compile_s, self.error_streak = 0.0, 0.0, 0
        if ledger is not None:
            ledger.actor_started.remote(self.key, self.started, self.vlm.describe())

    def __call__(self, batch: pa.Table) -> pa.Table:
        try:
            return self._call(batch)
        except faults.SystemicFault as exc:
            self._exit(batch.column("id").to_pylist(), str(exc))

    def _exit(self, ids: list[str], cause: str) -> NoReturn:
        """Leave the process so Ray restarts the actor (bounded) and retries the batch."""
        line = redact(cause.strip().splitlines()[0] if cause.strip() else cause)
        print(f"model actor exits on a systemic fault: {line}", file=sys.stderr, flush=True)
        if self.ledger is not None:
            ray.get(self.ledger.systemic_exit.remote(ids, line))
        os._exit(1)

    def _call(self, batch: pa.Table) -> pa.Table:
        rows = batch.drop_columns([PREPARED]).to_pylist()
        blobs = batch.column(PREPARED).to_pylist()
        todo = [i for i, r in enumerate(rows) if r["status"] == "ok"]
        ids = [rows[i]["id"] for i in todo]
        died, poisoned = self._begin(ids)
        if not died:
            self._answer_rows(rows, todo, [pickle.loads(blobs[i]) for i in todo])
        else:  # an earlier attempt of this batch killed its process: one item at a time
            for i in todo:
                if rows[i]["id"] in poisoned:
                    _quarantine(rows[i])
                    continue
                self._solo(rows, i, pickle.loads(blobs[i]))
        for r in rows:
            r.update(self.const, shadow=bool(r.get("shadow")) and r["status"] == "ok")
        if self.ledger is not None:
            self.ledger.end.remote(ids)
            self.ledger.actor_busy.remote(self.key, self.busy_s, self.compile_s)
        return pa.Table.from_pylist(rows, schema=output_schema(self._passthrough(batch)))

    def _passthrough(self, batch: pa.Table) -> pa.Schema:
        """The pass-through columns' types: given, else the batch's (the stage API does not
        run the user's pipeline to learn them)."""
        if self.passthrough is not None:
            return self.passthrough
        inp = self.spec.input
        return pa.schema([batch.schema.field(inp.output_name(c)) for c in inp.passthrough_columns])

    def _solo(self, rows: list[dict], i: int, item: PreparedItem) -> None:
        """Answer one item with the ledger told, so a crash here marks this item alone."""
        item_id = rows[i]["id"]
        ray.get(self.ledger.begin_solo.remote(item_id))
        self._answer_rows(rows, [i], [item])
        ray.get(self.ledger.end_solo.remote(item_id))

    def _begin(self, ids: list[str]) -> tuple[bool, list[str]]:
        if self.ledger is None:
            return False, []
        return ray.get(self.ledger.begin_batch.remote(ids))

    def _answer_rows(self, rows: list[dict], todo: list[int], items: list[PreparedItem]) -> None:
        """Answer ``items`` (the rows at ``todo``) pruned, then the shadow batches unpruned."""
        p = self.spec.pruning
        done = self._answer(items, self.pruner, p.keep_value)
        batches: dict[str, list[int]] = {}
        for k, (i, item, res) in enumerate(zip(todo, items, done, strict=True)):
            rows[i]["relevance_extractor"] = item.relevance_extractor
            _fill(rows[i], res)
            batches.setdefault(res.batch_id, []).append(k)
        c = self.spec.cost
        for group in batches.values():
            ids = [rows[todo[k]]["id"] for k in group]
            if shadow_batch(ids, c.shadow_fraction, c.shadow_seed):
                ok = [k for k in group if rows[todo[k]]["status"] == "ok"]
                self._shadow([rows[todo[k]] for k in ok], [items[k] for k in ok])

    def _shadow(self, rows: list[dict], items: list[PreparedItem]) -> None:
        """Answer one pruned batch's ok items unpruned (same packing rules): the shadow twin."""
        twins = self._answer(items, self.unpruned, 1.0)
        paired = all(isinstance(t.result, ItemResult) for t in twins)
        for row, twin in zip(rows, twins, strict=True):
            if paired:
                _fill_shadow(row, twin)
            else:  # a partial twin would bias the ratio: its time is failed work instead
                row["failed_gpu_seconds"] += twin.seconds + twin.failed_s

    def _answer(self, items: list[PreparedItem], pruner: Any, keep: Any) -> list[Answered]:
        """Answer items in batches that fit the budgets, in input order."""
        out: list[Any] = [None] * len(items)
        costs = [self._cost(it, pruner, keep) for it in items]
        for group in self._pack(items, costs, pruner, keep):
            for i, res in zip(
                group, self._run([items[i] for i in group], pruner, keep), strict=True
            ):
                out[i] = res
        return out

    def _pack(self, items, costs, pruner, keep) -> list[list[int]]:
        """Batches under the item cap, the token cap (set, or learnt from an out-of-memory)
        and, with ``auto`` on a GPU, the device bytes of `resprune.memory.BatchMemory`."""
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

    def _footprints(self, items, costs, pruner, keep) -> list[Any]:
        selects = pruner.name == "resprune"  # the one pruner that holds a Gram per batch
        keep = keep.max if isinstance(keep, EnergyKeep) else keep  # selection runs to max
        anyres = self.spec.pruning.anyres
        return [
            self.memory.item(it, cost=c, keep=keep if selects else None, anyres=anyres)
            for it, c in zip(items, costs, strict=True)
        ]

    def _shrink(self, items, pruner, keep) -> None:
        """After an out-of-memory with these items: budgets below what they needed, kept for
        the actor's later batches (each out-of-memory takes off another SHRINK share)."""
        costs = [self._cost(it, pruner, keep) for it in items]
        self.oom_tokens = max(1, int(SHRINK * sum(costs)))
        line = f"out of memory with {len(items)} items ({sum(costs)} LLM tokens)"
        if self.memory is not None:
            from resprune.memory import BatchShape

            shape = BatchShape()
            for foot in self._footprints(items, costs, pruner, keep):
                shape = self.memory.add(shape, foot)
            self.budget_bytes = int(SHRINK * min(self.budget_bytes, self.memory.bytes(shape)))
            line += f"; batches now within {self.budget_bytes / 2**30:.2f} GiB"
        print(
            f"model actor: {line} and {self.oom_tokens} LLM tokens",
            file=sys.stderr,
            flush=True,
        )

    def _run(self, items: list[PreparedItem], pruner: Any, keep: Any) -> list[Answered]:
        from resprune.answer import answer_batch

        kw = {
            "pruner": pruner,
            "keep": keep,
            "max_new_tokens": self.spec.model.max_new_tokens,
            "position_policy": self.spec.pruning.position_policy,
            "anyres": self.spec.pruning.anyres,
            "engine": self.engine,
        }
        batch_id, n = uuid.uuid4().hex[:16], len(items)
        started = self._start()
        try:
            results = answer_batch(self.vlm, items, **kw)
        except Exception as exc:
            lost = self._stop(started) / n
            if n > 1 and faults.is_oom(exc):  # too big a batch, not a bad item: smaller ones
                _free_device_memory()
                self._shrink(items, pruner, keep)
                redo = self._answer(items, pruner, keep)
                return [replace(a, failed_s=a.failed_s + lost) for a in redo]
            if faults.classify(exc, batch_size=n) == faults.SYSTEMIC:
                raise faults.SystemicFault(f"{type(exc).__name__}: {exc}") from exc
            if n == 1:
                return [Answered(self._model_error(exc), 0.0, batch_id, 1, lost)]
        else:
            self.error_streak = 0
            seconds = self._stop(started) / n
            return [Answered(r, seconds, batch_id, n) for r in results]
        _free_device_memory()
        solo = [a for it in items for a in self._run([it], pruner, keep)]
        return [replace(a, failed_s=a.failed_s + lost) for a in solo]

    def _model_error(self, exc: Exception) -> ItemError:
        """An item the model raised for alone; many in a row mean the model is broken."""
        self.error_streak += 1
        message = f"{type(exc).__name__}: {exc}"
        if self.error_streak >= ERROR_STREAK:
            raise faults.SystemicFault(
                f"the model raised for {ERROR_STREAK} items in a row, last: {message}"
            ) from exc
        return ItemError("model_error", message)

    def _start(self) -> tuple[float, float]:
        """Synchronise the device and start the clock (and the compile-and-capture count)."""
        from resprune import overhead

        self._sync()
        return time.perf_counter(), overhead.seconds()

    def _stop(self, started: tuple[float, float]) -> float:
        """Synchronise the device, stop the clock; returns the model seconds since ``started``:
        compile and capture seconds in between count as ``compile_s``, the rest as busy."""
        from resprune import overhead

        self._sync()
        wall, compiled = time.perf_counter() - started[0], overhead.seconds() - started[1]
        seconds = max(0.0, wall - compiled)
        self.busy_s += seconds
        self.compile_s += compiled
        return seconds

    def _sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def _cost(self, item: PreparedItem, pruner: Any, keep: Any) -> int:
        """LLM tokens the item will hold: pruned prompt + new tokens. Packing happens before
        selection, so an energy budget counts its max (an upper bound: batches never overrun
        the token budget, and hold fewer items than they could when images keep less)."""
        from resprune.adaptive import max_kept

        n = len(item.input_ids)
        visual = int((item.input_ids == self.image_token_id).sum())
        kept = visual if pruner.name == "none" else max_kept(keep, visual)
        return n - visual + kept + self.spec.model.max_new_tokens


def _free_device_memory() -> None:
    """Release cached blocks before retrying smaller (after an out-of-memory, say)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _fill(row: dict[str, Any], res: Answered) -> None:
    result = res.result
    row.update(batch_id=res.batch_id, batch_size=res.batch_size, failed_gpu_seconds=res.failed_s)
    if isinstance(result, ItemError):
        msg = f"id={row['id']}: {result.cause}: {redact(result.message)}"
        row.update(status="error", error_cause=result.cause, error=msg)
        row["failed_gpu_seconds"] += res.seconds  # its share of a batch that ran
        return
    row.update(
        answer=result.answer,
        visual_tokens=result.visual_tokens,
        kept_tokens=result.kept_tokens,
        kept_indices=list(result.kept_indices),
        retained_energy=result.retained_energy,
        prompt_tokens=result.prompt_tokens,
        prompt_tokens_unpruned=result.prompt_tokens_unpruned,
        new_tokens=result.new_tokens,
        gpu_seconds=res.seconds,
        vision_s=result.vision_s,
        select_s=result.select_s,
        generate_s=result.generate_s,
        kept_newlines=result.kept_newlines,
        relevance_mean=result.relevance_mean,
        relevance_max=result.relevance_max,
    )


def _quarantine(row: dict[str, Any]) -> None:
    msg = (
        f"id={row['id']}: crashed_worker: the model process died while answering this "
        "item alone; quarantined instead of retried"
    )
    row.update(status="error", error_cause="crashed_worker", error=msg)


def _fill_shadow(row: dict[str, Any], twin: Answered) -> None:
    result = twin.result
    row.update(
        shadow=True,
        shadow_answer=result.answer,
        shadow_gpu_seconds=twin.seconds,
        shadow_new_tokens=result.new_tokens,
        shadow_prompt_tokens=result.prompt_tokens,
    )
    row["failed_gpu_seconds"] += twin.failed_s
