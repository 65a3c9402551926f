"""Compose and run the job: plan -> one lazy Ray Data chain -> committed Parquet -> summary.

`build_dataset` chains the input reader and the stage API's processor (`pipeline.stages.processor`,
where concurrency, GPUs and batch sizes are set).
`run_job` is the driver: it plans (fails fast on whole-job problems before any model is
loaded), connects to Ray or starts a local cluster, executes the chain into `CommitSink`
under `pipeline.job.watchdog` (actors that cannot start, a cluster that goes away), writes
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
from pipeline.job.console import quiet, show_progress
from pipeline.job.plan import Plan, make_plan
from pipeline.job.watchdog import ClusterGone, Watchdog
from pipeline.monitoring import stderr_filter
from pipeline.monitoring.night import Night
from pipeline.output import commit, summary
from pipeline.output.commit import CommitSink
from pipeline.spec import JobSpec, ProcessorConfig, fingerprint, fingerprint_fields
from pipeline.stages.processor import build_processor

logger = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class Ledger:
    """Driver-side record of model actors (start, shape, busy and compile seconds) and of
    batches in flight.

    It outlives the actors, so a retried batch learns that an earlier attempt killed its
    process, and which item was being answered alone when it did (poison quarantine).
    """

    def __init__(self) -> None:
        self.actors: dict[str, dict[str, Any]] = {}
        self.batch_starts: dict[str, int] = {}  # ids whose batch started and never ended
        self.solo_starts: dict[str, int] = {}  # ids answered alone that never ended
        self.systemic: list[str] = []  # causes of actor exits on systemic faults
        self.placed_keys: set[str] = set()  # model actors whose constructor has begun

    def begin_batch(self, ids: list[str]) -> tuple[bool, list[str]]:
        """Start a model batch: (did an earlier attempt of it die?, ids that died alone)."""
        died = any(i in self.batch_starts for i in ids)
        for i in ids:
            self.batch_starts[i] = self.batch_starts.get(i, 0) + 1
        return died, [i for i in ids if i in self.solo_starts]

    def begin_solo(self, item_id: str) -> None:
        self.solo_starts[item_id] = self.solo_starts.get(item_id, 0) + 1

    def end_solo(self, item_id: str) -> None:
        self.solo_starts.pop(item_id, None)

    def end(self, ids: list[str]) -> None:
        for i in ids:
            self.batch_starts.pop(i, None)
            self.solo_starts.pop(i, None)

    def systemic_exit(self, ids: list[str], cause: str) -> None:
        """An actor exits on a systemic fault: its batch is no poison suspect; keep the cause."""
        self.end(ids)
        self.systemic.append(cause)

    def systemic_cause(self) -> str | None:
        """One line naming the systemic fault(s) of this run, or None."""
        if not self.systemic:
            return None
        return (
            f"systemic fault, the model actor exited {len(self.systemic)} time(s) and the "
            f"run could not progress: {self.systemic[-1]}; unanswered rows are left for "
            "a rerun"
        )

    def actor_placed(self, key: str) -> None:
        """A model actor got its resources: its constructor has begun (before the weights)."""
        self.placed_keys.add(key)

    def placed(self) -> int:
        return len(self.placed_keys)

    def actor_started(
        self, key: str, started: float, shape: dict[str, Any], actor_id: str | None = None
    ) -> None:
        """A model actor's process loaded its model (``actor_id``: its Ray actor, which a
        restart keeps, so the summary knows which process died)."""
        self.actors[key] = {
            "started": started,
            "busy_s": 0.0,
            "compile_s": 0.0,
            "shape": shape,
            "actor_id": actor_id,
            "last": time.time(),
        }

    def actor_busy(self, key: str, busy_s: float, compile_s: float = 0.0) -> None:
        """The actor's model seconds and its compile and capture seconds so far."""
        actor = self.actors.setdefault(key, {"started": time.time(), "shape": None})
        actor.update(busy_s=busy_s, compile_s=compile_s, last=time.time())

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return self.actors


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


def ensure_ray(spec: JobSpec) -> bool:
    """Connect to the current cluster (RAY_ADDRESS or a local `ray start`), else start one.

    ``RAY_ADDRESS=local`` always starts a private local cluster. Joining a `ray start` cluster
    found on this machine (``RAY_ADDRESS`` unset) is said in one line, since its resources
    may be taken. Returns True when this call started a local cluster (the caller shuts it
    down).
    """
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS", "")
    if address != "local":
        try:
            ray.init(address=address or "auto", log_to_driver=True)
        except ConnectionError:
            if address:
                raise
        else:
            if not address:
                print(
                    f"run: joined the Ray cluster at {ray.get_runtime_context().gcs_address} "
                    "that `ray start` left on this machine (RAY_ADDRESS=local starts a private "
                    "one instead)",
                    file=sys.stderr,
                    flush=True,
                )
            return False
    import torch

    gpus = torch.cuda.device_count()
    if spec.execution.gpus_per_actor > gpus:
        raise RuntimeError(
            f"execution.gpus_per_actor={spec.execution.gpus_per_actor} but this machine has "
            f"{gpus} GPU(s); set --set execution.gpus_per_actor=0 to run the model on CPU"
        )
    cpus = max(4, os.cpu_count() or 1)  # at least 4 slots: reading, CPU and model stages overlap
    # worker start-up may use the slots we declare (Ray's default is the physical core count,
    # and it warns on every run of a small machine otherwise)
    ray.init(
        num_cpus=cpus,
        num_gpus=gpus,
        include_dashboard=False,
        _system_config={"worker_maximum_startup_concurrency": cpus},
    )
    return True


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
    (`StartupTimeout`); a cluster that goes away ends the process (exit 1) once the summary
    is written and the lease released (Ray itself would end it a minute later).
    """
    quiet(progress=show_progress(progress))
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
        started_ray = ensure_ray(spec)
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
    ledger = Ledger.remote()
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

    with Watchdog(spec.execution, ledger, on_gone=gone) as watch:
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
            record.finish(_ask(ledger.snapshot, watch.snapshot), error=error)
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
