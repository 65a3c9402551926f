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
fault (`pipeline.faults`: a CUDA error, out of memory with one item, the model failing
``WINDOW_ERRORS`` of its last ``WINDOW_ITEMS`` items) is never written as an answer: the actor
exits so Ray restarts it and retries the batch, within ``execution.max_task_retries`` such
exits per run. The shadow sample
(`shadow`: systematic per actor and batch-size bucket) answers a drawn model batch again
unpruned on the same actor, as one batch of the same items (split only where the shadow's
budgets would not hold them unpruned), before or after its pruned pass (alternating), timed
by the same clock with compile and capture left out of both; a pruned batch that a failure
split has no twin. A twin is a
measurement: whatever it raises (out of memory included) is recorded on its rows
(``shadow_error``), never raised, never counted in the error window, and an out-of-memory
shrinks only the shadow's own budgets (its own `Packer`), never production's. The actor
reports its start, model shape and busy time to the run's ledger after every call (side
effects are at-least-once; the run's GPU-seconds come from committed rows instead). A batch
whose earlier attempt killed the actor process is answered
one item at a time (no twin), and an item that killed it while answered alone is quarantined
(``crashed_worker``) instead of retried: a poison item costs at most three attempts. A death
whose node the cluster has lost is nobody's fault: that batch is answered again whole.
Compile and capture time (`resprune.overhead`: the
first batch of each shape warms that shape up first, pruned and shadow alike) is left out of
the items' GPU seconds and the busy time; the actor reports it as ``compile_s``, which the run
summary and the cost report show as billed overhead. Non-goal: batching across Ray calls.

The parts live beside it: `packing` (budgets and batches), `shadow` (the shadow sample),
`failures` (error window, quarantine, exits) and `timing` (the device clock).
"""

from __future__ import annotations

import pickle
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa
import ray

from pipeline import faults
from pipeline.io.storage import redact
from pipeline.monitoring import metrics
from pipeline.output.columns import output_schema
from pipeline.spec import JobSpec
from pipeline.stages.failures import (
    WINDOW_ERRORS,
    ErrorWindow,
    exit_actor,
    free_device_memory,
    quarantine,
)
from pipeline.stages.packing import SHRINK, Packer, pack
from pipeline.stages.preprocess import PREPARED
from pipeline.stages.shadow import TWIN_FIRST, ShadowSample, Twin, fill_shadow
from pipeline.stages.timing import DeviceClock
from resprune.items import ItemError, PreparedItem

__all__ = ["SHRINK", "WINDOW_ERRORS", "Answered", "Answerer", "pack"]


@dataclass(frozen=True)
class Answered:
    """One item's outcome in a model batch: result (or ItemError) and its device time."""

    result: Any
    seconds: float  # the item's share of its batch's device time (0.0 when it failed)
    batch_id: str
    batch_size: int
    failed_s: float = 0.0  # its share of attempts that raised (batch split, lone failure)


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
        from resprune.pruners import build_pruner

        self.started, self.key = time.time(), uuid.uuid4().hex
        self.spec, self.ledger, self.passthrough = spec, ledger, passthrough
        if ledger is not None:  # the driver's startup watch: this actor got its resources
            ledger.actor_placed.remote(self.key)
        self.const = {
            "run_id": run_id,
            "run_date": run_date,
            "model": spec.model.path,
            "pruner": spec.pruning.method,
            "keep": str(spec.pruning.keep_value),
        }
        self.device, self.vlm, self.engine = _load(spec, share)
        p = spec.pruning
        self.pruner = build_pruner(
            p.method, alpha=p.alpha, seed=p.seed, relevance_floor=p.relevance_floor
        )
        self.unpruned = build_pruner("none")
        self.packer = Packer(spec, self.vlm, self.engine)
        self.shadow_packer = Packer(spec, self.vlm, self.engine, role="shadow twins")
        self.shadow = ShadowSample(spec.cost.shadow_fraction)
        self.clock, self.errors = DeviceClock(self.device), ErrorWindow()
        self.metrics = metrics.for_actor(run_id, run_date)
        self.node = ray.get_runtime_context().get_node_id() if ledger is not None else None
        if ledger is not None:
            actor_id = ray.get_runtime_context().get_actor_id()
            ledger.actor_started.remote(self.key, self.started, self.vlm.describe(), actor_id)

    def __call__(self, batch: pa.Table) -> pa.Table:
        try:
            return self._call(batch)
        except faults.SystemicFault as exc:
            exit_actor(self.ledger, batch.column("id").to_pylist(), str(exc))

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
                    quarantine(rows[i])
                    continue
                self._solo(rows, i, pickle.loads(blobs[i]))
        for r in rows:
            r.update(self.const, shadow=bool(r.get("shadow")) and r["status"] == "ok")
        self.metrics.record(rows)
        if self.ledger is not None:
            self.ledger.end.remote(ids)
            self.ledger.actor_busy.remote(self.key, self.clock.busy_s, self.clock.compile_s)
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
        ray.get(self.ledger.begin_solo.remote(item_id, self.node))
        self._answer_rows(rows, [i], [item], shadow=False)  # a twin must not be the crash
        ray.get(self.ledger.end_solo.remote(item_id))

    def _begin(self, ids: list[str]) -> tuple[bool, list[str]]:
        if self.ledger is None:
            return False, []
        return ray.get(self.ledger.begin_batch.remote(ids, self.node))

    def _answer_rows(
        self, rows: list[dict], todo: list[int], items: list[PreparedItem], shadow: bool = True
    ) -> None:
        """Answer ``items`` (the rows at ``todo``) pruned, in batches that fit the budgets; a
        batch drawn into the shadow sample is answered again unpruned, before or after its
        pruned pass (alternating)."""
        keep = self.spec.pruning.keep_value
        for group in self.packer.batches(items, self.pruner, keep):
            batch, mine = [items[k] for k in group], [rows[todo[k]] for k in group]
            order = self.shadow.draw(len(batch)) if shadow else None
            twin = self._twin(batch) if order == TWIN_FIRST else None
            done = self._run(batch, self.pruner, keep)
            for row, item, res in zip(mine, batch, done, strict=True):
                row["relevance_extractor"] = item.relevance_extractor
                _fill(row, res)
            paired = _one_batch(done) and any(r["status"] == "ok" for r in mine)
            if order is not None and paired:  # a split batch has no like-for-like twin
                fill_shadow(mine, twin or self._twin(batch))

    def _twin(self, items: list[PreparedItem]) -> Twin:
        """The unpruned twin of a pruned batch, timed by the same clock. Never raises: whatever
        fails is the twin's error; an out-of-memory shrinks the shadow's own budgets only."""
        from resprune.answer import answer_batch

        twin = Twin([0.0] * len(items), [None] * len(items))
        for group in self.shadow_packer.batches(items, self.unpruned, 1.0):
            batch = [items[i] for i in group]
            started = self.clock.start()
            try:
                out = answer_batch(self.vlm, batch, **self._answer_kwargs(self.unpruned, 1.0))
            except Exception as exc:  # a measurement never fails the night
                spent = sum(twin.seconds) + self._stop_quietly(started)
                if faults.is_oom(exc):
                    free_device_memory()
                    self.shadow_packer.shrink(batch, self.unpruned, 1.0)
                cause = redact(f"{type(exc).__name__}: {exc}".splitlines()[0])
                return Twin([spent / len(items)] * len(items), error=cause)
            each = self.clock.stop(started) / len(batch)
            for i, result in zip(group, out, strict=True):
                twin.results[i], twin.seconds[i] = result, each
        return twin

    def _stop_quietly(self, started: tuple[float, float]) -> float:
        """The clock's stop after a failed twin; 0.0 when the device cannot even synchronise
        (production's next batch meets that fault on its own path)."""
        try:
            return self.clock.stop(started)
        except Exception:
            return 0.0

    def _answer(self, items: list[PreparedItem], pruner: Any, keep: Any) -> list[Answered]:
        """Answer items in batches that fit the budgets, in input order."""
        out: list[Any] = [None] * len(items)
        for group in self.packer.batches(items, pruner, keep):
            answered = self._run([items[i] for i in group], pruner, keep)
            for i, res in zip(group, answered, strict=True):
                out[i] = res
        return out

    def _run(self, items: list[PreparedItem], pruner: Any, keep: Any) -> list[Answered]:
        """One batch through `resprune.answer.answer_batch`, timed; on failure: smaller
        batches after an out-of-memory, one item at a time otherwise, or a systemic fault."""
        from resprune.answer import answer_batch

        batch_id, n = uuid.uuid4().hex[:16], len(items)
        started = self.clock.start()
        try:
            results = answer_batch(self.vlm, items, **self._answer_kwargs(pruner, keep))
        except Exception as exc:
            lost = self.clock.stop(started) / n
            return [
                replace(a, failed_s=a.failed_s + lost)
                for a in self._retry(items, exc, pruner, keep, batch_id)
            ]
        if pruner is self.pruner:  # the production pass's results judge the model
            self.errors.observe(results)
        seconds = self.clock.stop(started) / n
        self.packer.ran(items, pruner, keep)  # after the clock: host arithmetic
        return [Answered(r, seconds, batch_id, n) for r in results]

    def _retry(
        self, items, exc: Exception, pruner: Any, keep: Any, batch_id: str
    ) -> list[Answered]:
        """What a failed batch becomes (its lost time is added by the caller)."""
        n = len(items)
        if n > 1 and faults.is_oom(exc):  # too big a batch, not a bad item: smaller ones
            free_device_memory()
            self.packer.shrink(items, pruner, keep)
            return self._answer(items, pruner, keep)
        if faults.classify(exc, batch_size=n) == faults.SYSTEMIC:
            raise faults.SystemicFault(f"{type(exc).__name__}: {exc}") from exc
        if n == 1:
            return [Answered(self.errors.model_error(exc), 0.0, batch_id, 1)]
        free_device_memory()
        return [a for it in items for a in self._run([it], pruner, keep)]

    def _answer_kwargs(self, pruner: Any, keep: Any) -> dict[str, Any]:
        p = self.spec.pruning
        return {
            "pruner": pruner,
            "keep": keep,
            "max_new_tokens": self.spec.model.max_new_tokens,
            "position_policy": p.position_policy,
            "anyres": p.anyres,
            "engine": self.engine,
        }


def _load(spec: JobSpec, share: Answerer | None) -> tuple[str, Any, Any]:
    """(device, VLM, engine): loaded once per actor, or ``share``'s."""
    import torch

    from resprune.engines import engine_class
    from resprune.loading import load_vlm

    m = spec.model
    engine = engine_class(m.engine)  # not installed: fail before loading weights
    gpu = spec.execution.gpus_per_actor > 0 and torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    if share is not None:
        return device, share.vlm, share.engine
    vlm = load_vlm(
        m.path,
        family=m.family,
        dtype=m.dtype if gpu else "float32",
        device=device,
        revision=m.revision,
        trust_remote_code=m.trust_remote_code,
        endpoint_url=spec.storage.endpoint_url,
        attn_implementation=m.attn_implementation,
    )
    if m.engine == "vllm":  # family auto: config.json named it only now
        from resprune.engines.vllm_plugin import vllm_refusal

        refusal = vllm_refusal(vlm.family, spec.pruning.position_policy)
        if refusal:
            raise ValueError(refusal)
    options = getattr(m, m.engine).model_dump()  # the engine's own settings block
    return device, vlm, engine(vlm, **options)


def _one_batch(done: list[Answered]) -> bool:
    """The pruned items were answered together in one batch (not split by a failure)."""
    return len({a.batch_id for a in done}) == 1 and done[0].batch_size == len(done)


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
