"""The model stage: one actor holds the VLM and answers prepared rows with the pruner.

Per call: rows that failed on the CPU pass through untouched; the rest are packed into
sub-batches by an LLM-token budget (``execution.max_batch_tokens``: prompt after pruning +
new tokens, so pruned items form proportionally larger batches; ``auto`` sizes it from free
GPU memory, see resprune/memory.py), answered, and timed on the device (synchronised wall
time split over the sub-batch's items; each row names its batch and its size). A sub-batch
that raises falls back to one item at a time, so one item cannot sink its batch; the failed
attempt's time stays on its items (``failed_gpu_seconds``). A systemic fault
(`pipeline.faults`: a CUDA error, out of memory with one item, ``ERROR_STREAK`` items in a
row raising) is never written as an answer: the actor exits so Ray restarts it and retries
the batch, within ``execution.max_task_retries``. The shadow sample is drawn by
batch: a seeded share of the model batches is answered again unpruned, packed under the same
size cap and token budget, right after its pruned pass on the same actor, so the time ratio
compares the main pass's own batches with their unpruned twins (same regime: batch 1 is
memory-bound, full batches are not). The actor reports its start, model shape and busy time
to the run's ledger (side effects are at-least-once; the run's GPU-seconds come from
committed rows instead). A batch whose earlier attempt killed the actor process is answered
one item at a time, and an item that killed it while answered alone is quarantined
(``crashed_worker``) instead of retried: a poison item costs at most three attempts
(``execution.max_task_retries`` >= 2). Non-goal: batching across Ray calls.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, NoReturn

import pyarrow as pa
import ray

from pipeline import faults
from pipeline.columns import output_schema
from pipeline.preprocess import PREPARED
from pipeline.spec import JobSpec
from pipeline.storage import redact
from resprune.items import ItemError, ItemResult, PreparedItem

ERROR_STREAK = 8  # consecutive items the model raised for: the model, not the items, is broken


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


def pack(costs: list[int], *, budget: int | None, max_items: int) -> list[list[int]]:
    """Group item indices (longest first) into batches under a token budget and a size cap."""
    order = sorted(range(len(costs)), key=lambda i: -costs[i])
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        over = budget is not None and used + costs[i] > budget
        if current and (over or len(current) >= max_items):
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += costs[i]
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
        passthrough: pa.Schema,
        ledger: Any = None,
        share: Answerer | None = None,
    ):
        """Load the model and engine, or reuse ``share``'s (`pipeline eval` answers every
        configuration with one model per actor)."""
        import torch

        from resprune.engines import engine_class
        from resprune.loading import load_vlm
        from resprune.memory import resolve_batch_tokens
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
            "keep": str(spec.pruning.keep),
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
        p = spec.pruning
        if m.engine == "vllm":  # family auto: config.json named it only now
            from resprune.engines.vllm_plugin import vllm_refusal

            refusal = vllm_refusal(self.vlm.family, p.position_policy)
            if refusal:
                raise ValueError(refusal)
        self.engine = share.engine if share else engine(self.vlm, **options)
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
        self.busy_s, self.error_streak = 0.0, 0
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
            self.ledger.actor_busy.remote(self.key, self.busy_s)
        return pa.Table.from_pylist(rows, schema=output_schema(self.passthrough))

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
        done = self._answer(items, self.pruner, p.keep)
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

    def _answer(self, items: list[PreparedItem], pruner: Any, keep: int | float) -> list[Answered]:
        """Answer items in token-budget batches, in input order."""
        out: list[Any] = [None] * len(items)
        ex = self.spec.execution
        costs = [self._cost(it, pruner, keep) for it in items]
        for group in pack(costs, budget=self.batch_tokens, max_items=ex.batch_size):
            for i, res in zip(
                group, self._run([items[i] for i in group], pruner, keep), strict=True
            ):
                out[i] = res
        return out

    def _run(self, items: list[PreparedItem], pruner: Any, keep: int | float) -> list[Answered]:
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

    def _start(self) -> float:
        """Synchronise the device and start the clock."""
        self._sync()
        return time.perf_counter()

    def _stop(self, started: float) -> float:
        """Synchronise the device, stop the clock, count the time as busy; returns seconds."""
        self._sync()
        seconds = time.perf_counter() - started
        self.busy_s += seconds
        return seconds

    def _sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def _cost(self, item: PreparedItem, pruner: Any, keep: int | float) -> int:
        """LLM tokens the item will hold: pruned prompt + new tokens."""
        from resprune.pruners import resolve_keep

        n = len(item.input_ids)
        visual = int((item.input_ids == self.image_token_id).sum())
        kept = visual if pruner.name == "none" else resolve_keep(keep, visual)
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
