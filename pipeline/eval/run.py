"""Answer a labelled set under every configuration, with one model per actor.

The job's own stages do the work: its reader and `Preprocess` (CPU), then `EvalAnswerer`,
an actor that loads the model once and holds one job `Answerer` per configuration sharing
it. Each batch is answered under every configuration back to back on the same actor, so
their times compare like with like; the first batch of each actor is answered once more
beforehand under every configuration and discarded (warm-up: each configuration's first
shapes, its selector and its caches are warm before any time is kept; later new shapes are
warmed up by the engine and their compile time is left out of the items'). Rows come back
to the driver (a labelled set is small) with a ``config`` column; the overlay items are
spread over different images. Non-goals: resume (an eval reruns whole), committed writes.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline.eval.spec import EvalSpec, check_references, configurations, job_of
from pipeline.io.readers import read_input
from pipeline.job.connect import ensure_ray
from pipeline.job.plan import Plan, make_plan
from pipeline.job.runner import new_run_id, release_lease
from pipeline.spec import JobSpec, ProcessorConfig, PruningSpec, anchor_local_paths
from pipeline.stages.answer import Answerer
from pipeline.stages.preprocess import Preprocess
from pipeline.stages.processor import actor_pool, fit_to_cluster, spare_cpus

CONFIG = "config"


class EvalAnswerer:
    """Map prepared rows to output rows once per configuration (rows x configurations)."""

    def __init__(
        self,
        spec: ProcessorConfig,
        configs: list[tuple[str, PruningSpec]],
        *,
        run_id: str,
        run_date: str,
        passthrough: pa.Schema,
    ):
        self.answerers: list[tuple[str, Answerer]] = []
        first = None  # its model and engine are loaded once and shared by every configuration
        for label, pruning in configs:
            job = spec.model_copy(update={"pruning": pruning})
            answerer = Answerer(
                job, run_id=run_id, run_date=run_date, passthrough=passthrough, share=first
            )
            first = first or answerer
            self.answerers.append((label, answerer))
        self.warm = False

    def __call__(self, batch: pa.Table) -> pa.Table:
        if not self.warm:  # every configuration, not only the first: shapes differ by keep
            for _, answerer in self.answerers:
                answerer(batch)
            self.warm = True
        tables = []
        for label, answerer in self.answerers:
            out = answerer(batch)
            tables.append(out.append_column(CONFIG, pa.array([label] * out.num_rows)))
        return pa.concat_tables(tables)


def answer_all(
    spec: EvalSpec, run_date: str, *, progress: bool = False
) -> tuple[pa.Table, dict[str, Any]]:
    """Every item under every configuration (the job's output columns plus ``config``), and
    the input images of up to ``eval.overlay_items`` items answered under all of them (on
    different images where the set has them)."""
    spec = anchor_local_paths(spec)  # before anything ships to workers
    job = job_of(spec)
    run_id = new_run_id(job, run_date)
    check_references(spec.input.uri, make_plan(job).passthrough, spec.eval.references_column)
    plan = make_plan(job, run_id=run_id)  # the read-only checks passed: now it takes the lease
    try:
        started_ray = ensure_ray(job)
        try:
            ray.data.DataContext.get_current().enable_progress_bars = progress
            configs = configurations(spec)
            ds = _dataset(job, plan, configs, run_id=run_id, run_date=run_date)
            table = pa.concat_tables(ray.get(ds.to_arrow_refs()))
            done = answered_by_all(table, len(configs))
            ids = _spread(job, plan, done, spec.eval.overlay_items)
            return table, _images(job, plan, ids)
        finally:
            if started_ray:
                ray.shutdown()
    finally:
        release_lease(plan, run_id)


def answered_by_all(table: pa.Table, n_configs: int) -> list[str]:
    """Ids answered ok under every configuration, sorted."""
    ok = table.filter(pc.equal(table["status"], "ok"))
    counts = pc.value_counts(ok["id"]).to_pylist()
    return sorted(c["values"] for c in counts if c["counts"] == n_configs)


def _spread(job: JobSpec, plan: Plan, ids: list[str], n: int) -> list[str]:
    """Up to ``n`` of ``ids`` (in order) on different images where the set has them (a VQA
    set asks several questions per image), topped up with the next ids when it has not."""
    if not n or not ids:
        return []
    column = job.input.image_column or job.input.image_uri_column
    kw = {"id_column": job.input.id_column, "column": column}
    rows = read_input(job.input, plan).map_batches(
        _image_keys, batch_format="pyarrow", fn_kwargs=kw
    )
    keys = {r["id"]: r["key"] for r in rows.take_all()}
    chosen: list[str] = []
    seen: set[str] = set()
    for i in ids:
        if len(chosen) < n and keys.get(i) not in seen:
            chosen.append(i)
            seen.add(keys.get(i))
    return chosen + [i for i in ids if i not in chosen][: n - len(chosen)]


def _image_keys(batch: pa.Table, *, id_column: str, column: str) -> pa.Table:
    """Each row's id and a key of its image: a digest of its bytes, else its path."""
    keys = []
    for value in batch.column(column).to_pylist():
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        keys.append(hashlib.sha256(value).hexdigest() if isinstance(value, bytes) else str(value))
    return pa.table({"id": batch.column(id_column), "key": pa.array(keys, pa.string())})


def _images(job: JobSpec, plan: Plan, ids: list[str]) -> dict[str, Any]:
    """The raw image values (bytes, Image() struct or path) of ``ids``, read again."""
    if not ids:
        return {}
    column = job.input.image_column or job.input.image_uri_column
    keep = {"column": job.input.id_column, "ids": ids}
    rows = (
        read_input(job.input, plan)
        .map_batches(_keep_ids, batch_format="pyarrow", fn_kwargs=keep)
        .take_all()
    )
    return {r[job.input.id_column]: r[column] for r in rows}


def _keep_ids(batch: pa.Table, *, column: str, ids: list[str]) -> pa.Table:
    return batch.filter(pc.is_in(batch.column(column), value_set=pa.array(ids)))


def _dataset(
    job: JobSpec, plan: Plan, configs: list[tuple[str, PruningSpec]], **ids: Any
) -> ray.data.Dataset:
    """The job's reader and CPU stage, then the all-configurations model stage."""
    config = fit_to_cluster(ProcessorConfig.from_job(job, dataset_folder=plan.dataset_folder))
    ex = config.execution
    passthrough = list(plan.passthrough.names)
    ds = read_input(job.input, plan)  # any input format the job reads
    ds = ds.repartition(target_num_rows_per_block=ex.batch_size)
    ds = ds.map_batches(
        Preprocess,
        fn_constructor_kwargs={"spec": config, "passthrough": passthrough},
        batch_size=ex.preprocess_batch_size,
        batch_format="pyarrow",
        num_cpus=1,
        compute=actor_pool(ex.preprocess_concurrency or (1, spare_cpus(config))),
        udf_modifying_row_count=False,
    )
    return ds.map_batches(
        EvalAnswerer,
        batch_size=ex.batch_size,
        batch_format="pyarrow",
        fn_constructor_kwargs={
            "spec": config,
            "configs": configs,
            "passthrough": plan.passthrough,
            **ids,
        },
        num_gpus=ex.gpus_per_actor,
        num_cpus=ex.cpus_per_actor,
        compute=actor_pool(ex.actors),
    )
