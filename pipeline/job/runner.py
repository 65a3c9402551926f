"""Compose and run the job: plan -> one lazy Ray Data chain -> committed Parquet -> summary.

`build_dataset` chains the input reader and the stage API's processor (`pipeline.stages.processor`,
where concurrency, GPUs and batch sizes are set).
`run_job` is the driver: it plans (fails fast on whole-job problems before any model is
loaded), connects to Ray or starts a local cluster, executes the chain into `CommitSink`
under `pipeline.job.watchdog` (actors that cannot start, nodes lost, a run that stops
moving, a cluster that goes away), writes
``_runs/<run_id>.json`` and releases the output prefix's lease, however the run ends.
Non-goals: scheduling, retries of the whole job (a rerun of the same spec resumes; see
pipeline.output.commit).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
import time
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline import faults
from pipeline.io.readers import read_input
from pipeline.io.storage import redact
from pipeline.job.connect import ensure_ray
from pipeline.job.console import quiet, show_progress
from pipeline.job.ledger import start_ledger
from pipeline.job.plan import Plan, make_plan
from pipeline.job.watchdog import ClusterGone, Watchdog
from pipeline.monitoring import stderr_filter
from pipeline.monitoring.night import Night
from pipeline.output import commit, summary
from pipeline.output.commit import CommitSink
from pipeline.spec import (
    JobSpec,
    ProcessorConfig,
    anchor_local_paths,
    fingerprint,
    fingerprint_fields,
)
from pipeline.stages.processor import build_processor, fit_to_cluster

logger = logging.getLogger(__name__)


def _drop_ids(batch: pa.Table, *, column: str, ids: list[str]) -> pa.Table:
    return batch.filter(pc.invert(pc.is_in(batch.column(column), value_set=pa.array(ids))))


def build_dataset(
    spec: JobSpec, plan: Plan, *, run_id: str, run_date: str, ledger: Any = None
) -> ray.data.Dataset:
    """The lazy chain: read the pending rows -> drop committed ids -> the stage API's processor."""
    ds = read_input(spec.input, plan)
    if plan.skip_ids:
        skip = {"column": spec.input.id_column, "ids": plan.skip_ids}
        ds = ds.map_batches(_drop_ids, batch_format="pyarrow", fn_kwargs=skip)
    config = ProcessorConfig.from_job(spec, dataset_folder=plan.dataset_folder)
    processor = build_processor(
        config, passthrough=plan.passthrough, run_id=run_id, run_date=run_date, ledger=ledger
    )
    return processor(ds)


def new_run_id(spec: JobSpec, run_date: str) -> str:
    """A unique id per attempt: name, run date, UTC start time, random suffix."""
    now = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{spec.name}-{run_date}-{now}-{uuid.uuid4().hex[:6]}"


def run_job(spec: JobSpec, run_date: str, *, progress: bool | None = None) -> dict[str, Any]:
    """Run (or resume) a job; returns the run summary (also written to _runs/).

    ``progress``: Ray Data's progress bars; None shows them only on a terminal (elsewhere
    they would print as dozens of snapshot lines). The run releases the output prefix's
    lease however it ends. While it executes, `pipeline.job.watchdog` watches the cluster: model
    actors that cannot start end the run after ``execution.startup_timeout_s``
    (`StartupTimeout`), as does a lost node when no capacity comes back (`NodeLost`); a run
    that stops moving ends after ``execution.stall_timeout_s`` (`StallTimeout`); a cluster
    that goes away ends the process (exit 1) once the summary is written and the lease
    released (Ray itself would end it a minute later).
    """
    quiet(progress=show_progress(progress))
    spec = anchor_local_paths(spec)  # before anything ships to workers
    run_id, started = new_run_id(spec, run_date), time.time()
    night = Night(
        spec, run_id=run_id, run_date=run_date, started=started, lines=not show_progress(progress)
    )
    try:
        doc = _run(spec, run_date, run_id=run_id, started=started, progress=progress, night=night)
    except BaseException as exc:
        night.failed(exc)  # the end-of-run record and the notification
        raise
    return night.finished(doc)  # the gate, the record, a notification


def _run(
    spec: JobSpec,
    run_date: str,
    *,
    run_id: str,
    started: float,
    progress: bool | None,
    night: Night,
) -> dict[str, Any]:
    plan = make_plan(spec, run_id=run_id)  # takes the lease
    try:
        record = summary.Recorder(spec, plan, run_id=run_id, run_date=run_date, started=started)
        if plan.items_pending == 0:
            return record.finish({})
        try:
            started_ray = ensure_ray(spec)
        except BaseException as exc:  # e.g. an unreachable cluster: the summary says so
            record.finish({}, error=exc)
            raise
        try:
            with night.running(plan):  # progress lines without a terminal
                return _execute(
                    spec,
                    plan,
                    record,
                    run_id=run_id,
                    run_date=run_date,
                    progress=progress,
                    night=night,
                )
        finally:
            if started_ray:
                ray.shutdown()
    finally:
        release_lease(plan, run_id)


def release_lease(plan: Plan, run_id: str) -> None:
    """Give the prefix's lease up (best effort: a failure is logged, never raised)."""
    try:
        faults.retry(
            lambda: commit.release_lease(plan.out_fs, plan.out_root, run_id),
            what="release the lease",
        )
    except Exception as exc:
        logger.warning("could not release the lease of %s: %s", plan.out_root, exc)


def _execute(
    spec: JobSpec,
    plan: Plan,
    record: summary.Recorder,
    *,
    run_id: str,
    run_date: str,
    progress: bool | None,
    night: Night | None = None,
) -> dict[str, Any]:
    """Execute the chain into the commit sink and finish the summary (also on failure)."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = show_progress(progress)
    ledger = start_ledger(spec.execution.max_task_retries)
    sink = CommitSink(
        spec.output.uri,
        spec.storage,
        run_id=run_id,
        fingerprint=fingerprint(spec),
        spec_fields=fingerprint_fields(spec),
        rows_per_file=spec.output.rows_per_file,
        min_rows_per_file=spec.output.min_rows_per_file,
    )

    def gone(error: ClusterGone, actors: dict[str, Any]) -> None:
        end_without_cluster(record, plan, run_id, error, actors, night)

    config = ProcessorConfig.from_job(spec, dataset_folder=plan.dataset_folder)
    layout = fit_to_cluster(config, quiet=True).execution  # for the watch's lines (said once)
    with Watchdog(layout, ledger, on_gone=gone) as watch:
        try:
            dataset = build_dataset(spec, plan, run_id=run_id, run_date=run_date, ledger=ledger)
            dataset.write_datasink(sink)
        except BaseException as exc:
            watch.settle()  # the cluster unreachable: the watchdog ends the run (gone) first
            error: BaseException = exc
            if watch.failure is not None:
                error = watch.failure
            elif isinstance(exc, Exception):
                cause = _ask(ledger.systemic_cause, None)
                error = faults.SystemicFault(cause) if cause else exc
            doc = record.finish(_ask(ledger.snapshot, watch.snapshot), error=error)
            if watch.failure is not None:  # the watchdog ended it: the summary line, then why
                print(summary.one_line(doc), flush=True)
            if error is exc:
                raise
            raise error from exc
    # An orphaned writer of an older run may have committed ids this run also answered.
    commit.dedupe(plan.out_fs, plan.out_root)
    return record.finish(ray.get(ledger.snapshot.remote()))


def _ask(method: Any, default: Any) -> Any:
    """A ledger call's answer after a failed execution, or ``default`` if none comes."""
    try:
        return ray.get(method.remote(), timeout=30)
    except Exception:
        return default


def end_without_cluster(
    record: summary.Recorder,
    plan: Plan,
    run_id: str,
    error: ClusterGone,
    actors: dict,
    night: Night | None = None,
) -> None:
    """The cluster went away: write the summary and release the lease from storage alone,
    print the summary line and the cause, push the record and notify (``night``), and end
    the process (exit 1)."""
    try:
        doc = record.finish(actors, error=error)
        print(summary.one_line(doc), flush=True)
        if night is not None:
            night.failed(error)
    finally:
        release_lease(plan, run_id)
        stderr_filter.restore()  # os._exit skips the filter's exit: forward its lines first
        print(f"error: run failed: ClusterGone: {redact(str(error))}", file=sys.stderr, flush=True)
        os._exit(1)
