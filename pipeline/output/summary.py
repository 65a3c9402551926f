"""The run summary ``_runs/<run_id>.json`` and the one-line report printed at the end.

Counts and GPU-seconds are sums over the commit markers this run wrote (unique committed
rows, never in-actor counters, which retries can double). ``actor_seconds`` is the model
actors' held time (what is billed): from each actor process's start to the end of the
execution, or, for a process that died (Ray restarted its actor: a later process reports the
same actor id), to its last report;
``model_seconds`` is the part of it spent inside the model, and ``compile_seconds`` the part
spent compiling and capturing each new shape (billed overhead: in ``actor_seconds``, never in
``model_seconds`` or any item's ``gpu_seconds``). ``execution.max_error_fraction``
is judged over every row committed under the output prefix, earlier runs' included
(``error_fraction`` in the summary), so a failed night stays failed on a rerun.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from typing import Any, Protocol

import pyarrow.fs as pafs

from pipeline.io.storage import join, redact, write_json
from pipeline.output import commit
from pipeline.spec import JobSpec, fingerprint

_SUMMED = (
    "rows",
    "items_ok",
    "items_error",
    "gpu_seconds",
    "shadow_items",
    "shadow_gpu_seconds",
    "shadow_failed_batches",
    "new_tokens",
)


class PlannedRun(Protocol):
    """What the summary reports of the job's plan (``pipeline.job.plan.Plan`` has it)."""

    out_fs: pafs.FileSystem
    out_root: str
    bad_shards: dict[str, str]
    items_total: int
    items_filtered: int
    items_skipped: int
    recovered_files: int

    @property
    def items_pending(self) -> int: ...


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds")


class Recorder:
    """Builds the summary of one run (attempt) and writes it under ``_runs/``."""

    def __init__(
        self, spec: JobSpec, plan: PlannedRun, *, run_id: str, run_date: str, started: float
    ):
        self.spec, self.plan, self.run_id, self.run_date = spec, plan, run_id, run_date
        self.started = started

    def finish(
        self, actors: dict[str, dict[str, Any]], error: BaseException | None = None
    ) -> dict[str, Any]:
        """Sum this run's markers, add actor times, write the JSON; returns it."""
        finished = time.time()
        every = commit.manifest_stats(self.plan.out_fs, self.plan.out_root)
        mine = [m for m in every if m.get("run_id") == self.run_id]
        totals = {k: sum(m.get(k, 0) for m in mine) for k in _SUMMED}
        totals["prefix_rows"] = sum(m.get("rows", 0) for m in every)
        totals["prefix_errors"] = sum(m.get("items_error", 0) for m in every)
        causes: Counter[str] = Counter()
        extractors: Counter[str] = Counter()
        for m in mine:
            causes.update(m.get("errors_by_cause", {}))
            extractors.update(m.get("relevance_extractors", {}))
        doc = self._header(finished) | self._counts(totals, dict(causes), len(mine), finished)
        doc["relevance_extractors"] = dict(extractors)
        doc |= self._actors(actors, finished)
        doc["error_fraction"] = self._error_fraction(totals)
        doc["status"], doc["failure"] = self._status(totals, error)
        doc["error"] = redact(f"{type(error).__name__}: {error}") if error else None
        doc["unreadable_shards"] = self.plan.bad_shards
        write_json(
            self.plan.out_fs, join(self.plan.out_root, commit.RUNS, f"{self.run_id}.json"), doc
        )
        return doc

    def _header(self, finished: float) -> dict[str, Any]:
        s, c, p = self.spec, self.spec.cost, self.spec.pruning
        gpu = s.execution.gpus_per_actor > 0  # what the model actors ran on, not the defaults
        return {
            "run_id": self.run_id,
            "name": s.name,
            "run_date": self.run_date,
            "started_at": _iso(self.started),
            "finished_at": _iso(finished),
            "wall_seconds": finished - self.started,
            "input_uri": s.input.uri,
            "input_filter": s.input.filter,
            "output_uri": s.output.uri,
            "model": s.model.path,
            "family": s.model.family,
            "device": "gpu" if gpu else "cpu",
            "dtype": s.model.dtype if gpu else "float32",  # CPU actors load float32
            "max_new_tokens": s.model.max_new_tokens,
            "pruner": p.method,
            "keep": str(p.keep_value),
            "alpha": p.alpha,
            "relevance_floor": p.relevance_floor,
            "gpu_type": c.gpu_type if gpu else "cpu",
            "usd_per_gpu_hour": c.usd_per_gpu_hour,
            "shadow_fraction": c.shadow_fraction,
            "gpus_per_actor": s.execution.gpus_per_actor,
            "batch_size": s.execution.batch_size,
            "max_batch_tokens": s.execution.max_batch_tokens,
            "spec_fingerprint": fingerprint(s),
        }

    def _counts(
        self, t: dict[str, Any], causes: dict[str, int], files: int, finished: float
    ) -> dict[str, Any]:
        wall = max(finished - self.started, 1e-9)
        return {
            "items_total": self.plan.items_total,
            "items_filtered_out": self.plan.items_filtered,
            "items_skipped": self.plan.items_skipped,
            "items_pending": self.plan.items_pending,
            "items_processed": t["rows"],
            "items_ok": t["items_ok"],
            "items_error": t["items_error"],
            "errors_by_cause": causes,
            "gpu_seconds": t["gpu_seconds"],
            "shadow_items": t["shadow_items"],
            "shadow_gpu_seconds": t["shadow_gpu_seconds"],
            "shadow_failed_batches": t["shadow_failed_batches"],
            "new_tokens": t["new_tokens"],
            "files_written": files,
            "files_recovered": self.plan.recovered_files,
            "items_per_second": t["rows"] / wall,
        }

    def _actors(self, actors: dict[str, dict[str, Any]], finished: float) -> dict[str, Any]:
        shapes = [a["shape"] for a in actors.values() if a.get("shape")]
        return {
            "actors": len(actors),
            "actor_seconds": held_seconds(actors, finished),
            "model_seconds": sum(a.get("busy_s", 0.0) for a in actors.values()),
            "compile_seconds": sum(a.get("compile_s", 0.0) for a in actors.values()),
            "model_shape": shapes[0] if shapes else None,
        }

    def _status(self, t: dict[str, Any], error: BaseException | None) -> tuple[str, str | None]:
        """("finished" | "failed", why it failed)."""
        if error is not None:
            return "failed", redact(f"{type(error).__name__}: {error}".splitlines()[0])
        left = self.plan.items_pending - t["rows"]
        if left > 0:
            return "failed", (
                f"{left} item(s) left unanswered (transient faults); rerun the "
                "same command to retry them"
            )
        if self.plan.bad_shards:  # their items are unanswered: the run is not finished
            first = next(iter(self.plan.bad_shards.values()))
            return "failed", (
                f"{len(self.plan.bad_shards)} unreadable input shard(s) skipped "
                f"(replace and rerun), e.g. {first}"
            )
        judged = self._error_fraction(t)
        if judged["exceeded"]:
            return "failed", (
                f"error fraction {judged['fraction']:.3f} > execution.max_error_fraction "
                f"{judged['limit']} ({judged['errors']} of {judged['items']} items committed "
                "under the output prefix, earlier runs included)"
            )
        return "finished", None

    def _error_fraction(self, t: dict[str, Any]) -> dict[str, Any]:
        """The error limit judged over every row committed under the output prefix (earlier
        runs' too), so a rerun of a night that failed it fails again instead of passing with
        everything skipped."""
        ex = self.spec.execution
        items, errors = t.get("prefix_rows", t["rows"]), t.get("prefix_errors", t["items_error"])
        fraction = errors / items if items else 0.0
        judged = items >= ex.error_fraction_min_items
        return {
            "scope": "output prefix (all committed rows)",
            "items": items,
            "errors": errors,
            "fraction": fraction,
            "limit": ex.max_error_fraction,
            "judged": judged,
            "min_items": ex.error_fraction_min_items,
            "exceeded": judged and fraction > ex.max_error_fraction,
        }


def held_seconds(actors: dict[str, dict[str, Any]], finished: float) -> float:
    """Billed seconds of the model actors' processes: each from its start to ``finished``,
    or, when a later process of the same Ray actor started (a restart: this one died), to its
    last report (start, or end of its last call), never past that successor's start."""
    total = 0.0
    for a in actors.values():
        end = finished
        later = [
            b["started"]
            for b in actors.values()
            if a.get("actor_id")
            and b.get("actor_id") == a["actor_id"]
            and b["started"] > a["started"]
        ]
        if later:
            end = min(a.get("last", a["started"]), min(later))
        total += max(0.0, end - a["started"])
    return total


def one_line(doc: dict[str, Any]) -> str:
    """The human summary printed at the end of `pipeline run`."""
    return (
        f"{doc['name']} {doc['run_date']} {doc['status']}: {doc['items_ok']} ok, "
        f"{doc['items_error']} error, {doc['items_skipped']} skipped of {doc['items_total']} "
        f"in {doc['wall_seconds']:.1f}s ({doc['items_per_second']:.2f} items/s), "
        f"gpu {doc['gpu_seconds']:.1f}s, actors {doc['actor_seconds']:.1f}s "
        f"(compile {doc.get('compile_seconds', 0.0):.1f}s) -> "
        f"{doc['output_uri']} (summary _runs/{doc['run_id']}.json)"
        + (f"; failed: {doc['failure']}" if doc.get("failure") else "")
        + _unjudged(doc.get("error_fraction"))
    )


def _unjudged(judged: dict[str, Any] | None) -> str:
    """A note when errors were committed but too few items to judge the error limit."""
    if not judged or judged["judged"] or not judged["errors"]:
        return ""
    return (
        f"; error limit not applied: {judged['errors']} error(s) in {judged['items']} item(s), "
        f"fewer than execution.error_fraction_min_items={judged['min_items']}"
    )
