"""The run summary ``_runs/<run_id>.json`` and the one-line report printed at the end.

Counts and GPU-seconds are sums over the commit markers this run wrote (unique committed
rows, never in-actor counters, which retries can double). ``actor_seconds`` is the model
actors' held time: from each actor's start to the end of the execution (what is billed);
``model_seconds`` is the part of it spent inside the model, and ``compile_seconds`` the part
spent compiling and capturing each new shape (billed overhead: in ``actor_seconds``, never in
``model_seconds`` or any item's ``gpu_seconds``).
"""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from typing import Any

from pipeline import commit
from pipeline.plan import Plan
from pipeline.spec import JobSpec, fingerprint
from pipeline.storage import join, redact, write_json

_SUMMED = (
    "rows",
    "items_ok",
    "items_error",
    "gpu_seconds",
    "shadow_items",
    "shadow_gpu_seconds",
    "new_tokens",
)


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds")


class Recorder:
    """Builds the summary of one run (attempt) and writes it under ``_runs/``."""

    def __init__(self, spec: JobSpec, plan: Plan, *, run_id: str, run_date: str, started: float):
        self.spec, self.plan, self.run_id, self.run_date = spec, plan, run_id, run_date
        self.started = started

    def finish(
        self, actors: dict[str, dict[str, Any]], error: BaseException | None = None
    ) -> dict[str, Any]:
        """Sum this run's markers, add actor times, write the JSON; returns it."""
        finished = time.time()
        mine = [
            m
            for m in commit.manifest_stats(self.plan.out_fs, self.plan.out_root)
            if m.get("run_id") == self.run_id
        ]
        totals = {k: sum(m.get(k, 0) for m in mine) for k in _SUMMED}
        causes: Counter[str] = Counter()
        extractors: Counter[str] = Counter()
        for m in mine:
            causes.update(m.get("errors_by_cause", {}))
            extractors.update(m.get("relevance_extractors", {}))
        doc = self._header(finished) | self._counts(totals, dict(causes), len(mine), finished)
        doc["relevance_extractors"] = dict(extractors)
        doc |= self._actors(actors, finished)
        doc["status"], doc["failure"] = self._status(totals, error)
        doc["error"] = redact(f"{type(error).__name__}: {error}") if error else None
        doc["unreadable_shards"] = self.plan.bad_shards
        write_json(
            self.plan.out_fs, join(self.plan.out_root, commit.RUNS, f"{self.run_id}.json"), doc
        )
        return doc

    def _header(self, finished: float) -> dict[str, Any]:
        s, c, p = self.spec, self.spec.cost, self.spec.pruning
        return {
            "run_id": self.run_id,
            "name": s.name,
            "run_date": self.run_date,
            "started_at": _iso(self.started),
            "finished_at": _iso(finished),
            "wall_seconds": finished - self.started,
            "input_uri": s.input.uri,
            "output_uri": s.output.uri,
            "model": s.model.path,
            "family": s.model.family,
            "dtype": s.model.dtype,
            "max_new_tokens": s.model.max_new_tokens,
            "pruner": p.method,
            "keep": str(p.keep),
            "alpha": p.alpha,
            "relevance_floor": p.relevance_floor,
            "gpu_type": c.gpu_type,
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
            "items_skipped": self.plan.items_skipped,
            "items_pending": self.plan.items_pending,
            "items_processed": t["rows"],
            "items_ok": t["items_ok"],
            "items_error": t["items_error"],
            "errors_by_cause": causes,
            "gpu_seconds": t["gpu_seconds"],
            "shadow_items": t["shadow_items"],
            "shadow_gpu_seconds": t["shadow_gpu_seconds"],
            "new_tokens": t["new_tokens"],
            "files_written": files,
            "files_recovered": self.plan.recovered_files,
            "items_per_second": t["rows"] / wall,
        }

    def _actors(self, actors: dict[str, dict[str, Any]], finished: float) -> dict[str, Any]:
        shapes = [a["shape"] for a in actors.values() if a.get("shape")]
        return {
            "actors": len(actors),
            "actor_seconds": sum(finished - a["started"] for a in actors.values()),
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
        ex = self.spec.execution
        if t["rows"] >= ex.error_fraction_min_items and t["items_error"] / t["rows"] > (
            ex.max_error_fraction
        ):
            return "failed", (
                f"error fraction {t['items_error'] / t['rows']:.3f} > "
                f"execution.max_error_fraction {ex.max_error_fraction}"
            )
        return "finished", None


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
    )
