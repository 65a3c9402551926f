"""The model stage: one actor holds the VLM and answers prepared rows with the pruner.

Per call: rows that failed on the CPU pass through untouched; the rest are packed into
sub-batches by an LLM-token budget (``execution.max_batch_tokens``: prompt after pruning +
new tokens, so pruned items form proportionally larger batches), answered, and timed on the
device (synchronised wall time split over the sub-batch's items). A sub-batch that raises
falls back to one item at a time, so one item cannot sink its batch. Shadow rows are
answered again, pruned and unpruned in batches of the same make-up, on the same actor, so
their time ratio compares like with like. The actor reports its start, model shape and
busy time to the run's ledger (side effects are at-least-once; the run's GPU-seconds come
from committed rows instead). A batch whose earlier attempt killed the actor process is
answered one item at a time, and an item that killed it while answered alone is quarantined
(``crashed_worker``) instead of retried: a poison item costs at most three attempts
(``execution.max_task_retries`` >= 2). Non-goal: batching across Ray calls.
"""

from __future__ import annotations

import pickle
import time
import uuid
from typing import Any

import pyarrow as pa
import ray

from pipeline.columns import output_schema
from pipeline.preprocess import PREPARED
from pipeline.spec import JobSpec
from pipeline.storage import redact
from resprune.items import ItemError, ItemResult, PreparedItem


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

    def __init__(self, spec: JobSpec, *, run_id: str, run_date: str, passthrough: pa.Schema,
                 ledger: Any = None):  # fmt: skip
        import torch

        from resprune.engines import engine_class
        from resprune.loading import load_vlm
        from resprune.pruners import build_pruner

        self.started, self.key = time.time(), uuid.uuid4().hex
        self.spec, self.ledger, self.passthrough = spec, ledger, passthrough
        self.const = {"run_id": run_id, "run_date": run_date, "model": spec.model.path,
                      "pruner": spec.pruning.method, "keep": str(spec.pruning.keep)}  # fmt: skip
        engine = engine_class(spec.model.engine)  # not installed: fail before loading weights
        gpu = spec.execution.gpus_per_actor > 0 and torch.cuda.is_available()
        self.device = "cuda" if gpu else "cpu"
        m = spec.model
        self.vlm = load_vlm(
            m.path, family=m.family, dtype=m.dtype if gpu else "float32", device=self.device,
            revision=m.revision, trust_remote_code=m.trust_remote_code,
            endpoint_url=spec.storage.endpoint_url,
        )  # fmt: skip
        options = m.vllm.model_dump() if m.engine == "vllm" else {}
        self.engine = engine(self.vlm, **options)
        p = spec.pruning
        self.pruner = build_pruner(p.method, alpha=p.alpha, seed=p.seed)
        self.unpruned = build_pruner("none")
        self.image_token_id = int(self.vlm.model.config.image_token_id)
        self.busy_s = 0.0
        if ledger is not None:
            ledger.actor_started.remote(self.key, self.started, self.vlm.describe())

    def __call__(self, batch: pa.Table) -> pa.Table:
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
            r.update(self.const, shadow=bool(r["shadow"] and r["status"] == "ok"))
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
        """Answer ``items`` (the rows at ``todo``) pruned, then the shadow pairs."""
        p = self.spec.pruning
        for i, item, res in zip(todo, items, self._answer(items, self.pruner, p.keep), strict=True):
            rows[i]["relevance_extractor"] = item.relevance_extractor
            _fill(rows[i], res)
        shadow = [k for k, i in enumerate(todo) if rows[i]["shadow"] and rows[i]["status"] == "ok"]
        # Time the pair on the same items in batches of the same make-up: the pruned times of
        # the main pass come from fuller batches and would flatter the ratio.
        pair = [items[k] for k in shadow]
        pruned = self._answer(pair, self.pruner, p.keep)
        unpruned = self._answer(pair, self.unpruned, 1.0)
        for k, res, again in zip(shadow, unpruned, pruned, strict=True):
            _fill_shadow(rows[todo[k]], res, again)

    def _answer(self, items: list[PreparedItem], pruner: Any, keep: int | float) -> list[Any]:
        """Answer items in token-budget batches; returns (result or ItemError, seconds) pairs."""
        out: list[Any] = [None] * len(items)
        ex = self.spec.execution
        costs = [self._cost(it, pruner, keep) for it in items]
        for group in pack(costs, budget=ex.max_batch_tokens, max_items=ex.batch_size):
            for i, res in zip(
                group, self._run([items[i] for i in group], pruner, keep), strict=True
            ):
                out[i] = res
        return out

    def _run(self, items: list[PreparedItem], pruner: Any, keep: int | float) -> list[Any]:
        from resprune.answer import answer_batch

        kw = {"pruner": pruner, "keep": keep, "max_new_tokens": self.spec.model.max_new_tokens,
              "position_policy": self.spec.pruning.position_policy,
              "anyres": self.spec.pruning.anyres, "engine": self.engine}  # fmt: skip
        try:
            results, seconds = self._timed(answer_batch, items, **kw)
            return [(r, seconds / len(items)) for r in results]
        except Exception as exc:
            if len(items) == 1:
                return [(ItemError("model_error", f"{type(exc).__name__}: {exc}"), 0.0)]
        return [r for it in items for r in self._run([it], pruner, keep)]

    def _timed(self, fn: Any, items: list[PreparedItem], **kw: Any) -> tuple[list[Any], float]:
        import torch

        sync = torch.cuda.synchronize if self.device == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        results = fn(self.vlm, items, **kw)
        sync()
        seconds = time.perf_counter() - t0
        self.busy_s += seconds
        return results, seconds

    def _cost(self, item: PreparedItem, pruner: Any, keep: int | float) -> int:
        """LLM tokens the item will hold: pruned prompt + new tokens."""
        from resprune.pruners import resolve_keep

        n = len(item.input_ids)
        visual = int((item.input_ids == self.image_token_id).sum())
        kept = visual if pruner.name == "none" else resolve_keep(keep, visual)
        return n - visual + kept + self.spec.model.max_new_tokens


def _fill(row: dict[str, Any], res: tuple[Any, float]) -> None:
    result, seconds = res
    if isinstance(result, ItemError):
        msg = f"id={row['id']}: {result.cause}: {redact(result.message)}"
        row.update(status="error", error_cause=result.cause, error=msg)
        return
    row.update(
        answer=result.answer, visual_tokens=result.visual_tokens, kept_tokens=result.kept_tokens,
        kept_indices=list(result.kept_indices), retained_energy=result.retained_energy,
        prompt_tokens=result.prompt_tokens, prompt_tokens_unpruned=result.prompt_tokens_unpruned,
        new_tokens=result.new_tokens, gpu_seconds=seconds, vision_s=result.vision_s,
        select_s=result.select_s, generate_s=result.generate_s,
    )  # fmt: skip


def _quarantine(row: dict[str, Any]) -> None:
    msg = (f"id={row['id']}: crashed_worker: the model process died while answering this "
           "item alone; quarantined instead of retried")  # fmt: skip
    row.update(status="error", error_cause="crashed_worker", error=msg)


def _fill_shadow(row: dict[str, Any], res: tuple[Any, float], pruned: tuple[Any, float]) -> None:
    result, seconds = res
    if isinstance(result, ItemResult) and isinstance(pruned[0], ItemResult):
        row.update(shadow_answer=result.answer, shadow_gpu_seconds=seconds,
                   shadow_pruned_gpu_seconds=pruned[1], shadow_new_tokens=result.new_tokens,
                   shadow_prompt_tokens=result.prompt_tokens)  # fmt: skip
    else:
        row["shadow"] = False  # the unpruned pass failed: not a usable shadow pair
