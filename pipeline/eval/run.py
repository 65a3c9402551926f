"""Answer a labelled set under every configuration, with one model per actor.

The job's own stages do the work: its reader and `Preprocess` (CPU), then `EvalAnswerer`,
an actor that loads the model once and holds one job `Answerer` per configuration sharing
it. Each batch is answered under every configuration back to back on the same actor, so
their times compare like with like; the first batch of each actor is answered once more
beforehand and discarded (warm-up). Rows come back to the driver (a labelled set is small)
with a ``config`` column. Non-goals: resume (an eval reruns whole), committed writes.
"""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa
import ray

from pipeline.answer_stage import Answerer
from pipeline.checks import check_model_path
from pipeline.eval.spec import EvalSpec, configurations, job_of
from pipeline.plan import Plan, make_plan
from pipeline.preprocess import Preprocess
from pipeline.processor import actor_pool, spare_cpus
from pipeline.readers import read_input
from pipeline.runner import ensure_ray, new_run_id
from pipeline.spec import JobSpec, PruningSpec

CONFIG = "config"


class EvalAnswerer:
    """Map prepared rows to output rows once per configuration (rows x configurations)."""

    def __init__(self, spec: JobSpec, configs: list[tuple[str, PruningSpec]], *, run_id: str,
                 run_date: str, passthrough: pa.Schema):  # fmt: skip
        self.answerers: list[tuple[str, Answerer]] = []
        first = None  # its model and engine are loaded once and shared by every configuration
        for label, pruning in configs:
            job = spec.model_copy(update={"pruning": pruning})
            answerer = Answerer(job, run_id=run_id, run_date=run_date, passthrough=passthrough,
                                share=first)  # fmt: skip
            first = first or answerer
            self.answerers.append((label, answerer))
        self.warm = False

    def __call__(self, batch: pa.Table) -> pa.Table:
        if not self.warm:
            self.answerers[0][1](batch)
            self.warm = True
        tables = []
        for label, answerer in self.answerers:
            out = answerer(batch)
            tables.append(out.append_column(CONFIG, pa.array([label] * out.num_rows)))
        return pa.concat_tables(tables)


def answer_all(spec: EvalSpec, run_date: str, *, progress: bool = False) -> pa.Table:
    """Every item under every configuration: the job's output columns plus ``config``."""
    job = job_of(spec)
    run_id = new_run_id(job, run_date)
    plan = make_plan(job, run_id=run_id)
    check_model_path(job)
    started_ray = ensure_ray(job)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = progress
        t0 = time.perf_counter()
        ds = _dataset(job, plan, configurations(spec), run_id=run_id, run_date=run_date)
        table = pa.concat_tables(ray.get(ds.to_arrow_refs()))
        return table.replace_schema_metadata({"wall_seconds": f"{time.perf_counter() - t0}"})
    finally:
        if started_ray:
            ray.shutdown()


def _dataset(job: JobSpec, plan: Plan, configs: list[tuple[str, PruningSpec]],
             **ids: Any) -> ray.data.Dataset:  # fmt: skip
    """The job's read and CPU stages, then the all-configurations model stage."""
    ex = job.execution
    passthrough = list(plan.passthrough.names)
    ds = read_input(job.input, plan)  # any input format the job reads
    ds = ds.repartition(target_num_rows_per_block=ex.batch_size)
    ds = ds.map_batches(
        Preprocess, fn_constructor_kwargs={"spec": job, "passthrough": passthrough},
        batch_size=ex.preprocess_batch_size, batch_format="pyarrow", num_cpus=1,
        compute=actor_pool(ex.preprocess_concurrency or (1, spare_cpus(job))),
        udf_modifying_row_count=False,
    )  # fmt: skip
    return ds.map_batches(
        EvalAnswerer, batch_size=ex.batch_size, batch_format="pyarrow",
        fn_constructor_kwargs={"spec": job, "configs": configs, "passthrough": plan.passthrough,
                               **ids},
        num_gpus=ex.gpus_per_actor, num_cpus=ex.cpus_per_actor, compute=actor_pool(ex.actors),
    )  # fmt: skip
