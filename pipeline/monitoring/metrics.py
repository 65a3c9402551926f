"""Live metrics of the model actors through Ray's metrics API (`ray.util.metrics`).

Each answer actor records its finished rows after every call (`ActorMetrics.record`); Ray's
metrics agent on the node exports them on its Prometheus endpoint (the node's
``metrics_export_port``) beside Ray's own, with Ray's ``ray_`` namespace prefix, e.g.
``ray_resprune_items_total``. Every metric carries the tags ``job_name`` (the spec's name) and
``run_date`` (not ``job``: Prometheus sets ``job`` to the scrape job and would rename ours to
``exported_job``). `EXPORTED` lists the names as Prometheus sees them (the dashboard and rules in
infra/ may use only these, checked by a test). Side effects are at-least-once: a retried
batch counts again, so the night's exact numbers are the run summary's, not these.
"""

from __future__ import annotations

import logging
import time
from typing import Any

logger = logging.getLogger(__name__)

PREFIX = "ray_"  # Ray's metrics agent exports application metrics under its namespace
SELECT_BOUNDARIES = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
MODEL_BOUNDARIES = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
TAGS = ("job_name", "run_date")

# name -> (kind, description); kind is what Prometheus sees (histograms add _bucket/_sum/_count)
METRICS: dict[str, tuple[str, str]] = {
    "resprune_items": ("counter", "Rows answered by the model stage, by status and error cause."),
    "resprune_visual_tokens_in": ("counter", "Visual tokens of the answered items before pruning."),
    "resprune_visual_tokens_kept": ("counter", "Visual tokens the pruner kept."),
    "resprune_selection_seconds": ("histogram", "Token selection time per item (seconds)."),
    "resprune_model_seconds": ("histogram", "Device time per model batch (seconds)."),
    "resprune_batch_size": ("histogram", "Items per model batch."),
    "resprune_last_progress_timestamp_seconds": (
        "gauge",
        "Unix time the model stage last finished a call (for hang alerts).",
    ),
    "resprune_run_in_progress": ("gauge", "1 while the job's driver executes a run, else 0."),
}


def exported_names() -> set[str]:
    """Every series name these metrics have on the Prometheus endpoint."""
    names: set[str] = set()
    for name, (kind, _) in METRICS.items():
        full = PREFIX + name
        if kind == "counter":
            names.add(full + "_total")
        elif kind == "histogram":
            names |= {full + "_bucket", full + "_sum", full + "_count"}
        else:
            names.add(full)
    return names


class ActorMetrics:
    """The metrics one answer actor records; created in the actor (needs a Ray worker)."""

    def __init__(self, job: str, run_date: str):
        from ray.util.metrics import Counter, Gauge, Histogram

        def describe(name: str) -> dict[str, Any]:
            return {"name": name, "description": METRICS[name][1]}

        self.items = Counter(**describe("resprune_items"), tag_keys=(*TAGS, "status", "cause"))
        self.tokens_in = Counter(**describe("resprune_visual_tokens_in"), tag_keys=TAGS)
        self.tokens_kept = Counter(**describe("resprune_visual_tokens_kept"), tag_keys=TAGS)
        self.select = Histogram(
            **describe("resprune_selection_seconds"), boundaries=SELECT_BOUNDARIES, tag_keys=TAGS
        )
        self.model = Histogram(
            **describe("resprune_model_seconds"), boundaries=MODEL_BOUNDARIES, tag_keys=TAGS
        )
        self.batch = Histogram(
            **describe("resprune_batch_size"), boundaries=BATCH_BOUNDARIES, tag_keys=TAGS
        )
        self.progress = Gauge(**describe("resprune_last_progress_timestamp_seconds"), tag_keys=TAGS)
        self.tags = {"job_name": job, "run_date": run_date}
        for metric in (self.items, self.tokens_in, self.tokens_kept, self.select):
            metric.set_default_tags(self.tags)
        for metric in (self.model, self.batch, self.progress):
            metric.set_default_tags(self.tags)

    def record(self, rows: list[dict[str, Any]]) -> None:
        """Count one call's output rows (a failure to record is logged, never raised)."""
        try:
            self._record(rows)
        except Exception as exc:
            logger.warning("could not record live metrics: %s", exc)

    def _record(self, rows: list[dict[str, Any]]) -> None:
        """Statuses, tokens, selection time, and the batches' sizes and device time (each
        batch once, from its rows)."""
        batches: dict[str, tuple[int, float]] = {}
        for row in rows:
            status = str(row.get("status") or "unknown")
            cause = str(row.get("error_cause") or "") if status == "error" else ""
            self.items.inc(1, {"status": status, "cause": cause})
            if status != "ok":
                continue
            _add(self.tokens_in, row.get("visual_tokens"))
            _add(self.tokens_kept, row.get("kept_tokens"))
            self.select.observe(row.get("select_s") or 0.0)
            if row.get("batch_id"):
                size = int(row.get("batch_size") or 1)
                batches[row["batch_id"]] = (size, (row.get("gpu_seconds") or 0.0) * size)
        for size, seconds in batches.values():
            self.batch.observe(size)
            self.model.observe(seconds)
        self.progress.set(time.time())


class RunGauge:
    """The driver's ``resprune_run_in_progress`` (1 while executing), so a hang alert fires
    only during a run; never fails the run."""

    def __init__(self, job: str, run_date: str):
        self.gauge: Any = None
        try:
            from ray.util.metrics import Gauge

            name = "resprune_run_in_progress"
            self.gauge = Gauge(name, description=METRICS[name][1], tag_keys=TAGS)
            self.gauge.set_default_tags({"job_name": job, "run_date": run_date})
        except Exception as exc:
            logger.warning("live metrics off in the driver: %s", exc)

    def set(self, value: int) -> None:
        if self.gauge is None:
            return
        try:
            self.gauge.set(value)
        except Exception as exc:
            logger.warning("could not record live metrics: %s", exc)


class _Off:
    """Stands in when Ray's metrics cannot be created (no Ray worker): records nothing."""

    def record(self, rows: list[dict[str, Any]]) -> None:
        return None


def for_actor(run_id: str, run_date: str) -> ActorMetrics | _Off:
    """The answer actor's metrics, tagged with the job (the run id's name part: the job's run
    ids are ``<name>-<run_date>-<time>-<suffix>``, the stage API's ``processor-<time>-<suffix>``)
    and run date; never fails the actor."""
    marker = f"-{run_date}-"
    job = run_id.split(marker)[0] if marker in run_id else run_id.split("-")[0]
    try:
        return ActorMetrics(job, run_date)
    except Exception as exc:  # metrics are for the on-call; the answers matter more
        logger.warning("live metrics off in this actor: %s", exc)
        return _Off()


def _add(counter: Any, value: float | None) -> None:
    if value:  # Ray's counters take positive increments only
        counter.inc(value)
