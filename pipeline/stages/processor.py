"""The stage API: answer the rows of any Ray Dataset, as ``ray.data.llm`` processors do.

    import ray
    from pipeline import ProcessorConfig, build_processor

    config = ProcessorConfig.model_validate({"model": {"path": "llava-hf/llava-1.5-7b-hf"},
                                             "pruning": {"keep": 64}})
    processor = build_processor(
        config,
        preprocess=lambda r: {"id": r["path"], "image": r["image"], "question": None},
        postprocess=lambda r: {"id": r["id"], "caption": r["answer"], "status": r["status"]},
    )
    ds = processor(ray.data.read_images("s3://bucket/photos/", include_paths=True, mode="RGB"))
    ds.filter(lambda r: r["status"] == "ok").write_parquet("s3://bucket/captions/")

The dataset needs an id column, an image column (encoded bytes, the ``datasets`` ``Image()``
struct, ``read_images``' uint8 arrays, PIL images or numpy arrays from a user's ``map``, or
paths with ``image_uri_column``) and, optionally, a question column. Building it runs nothing:
columns are checked from the dataset's plan when it knows them, else on the first block in
the CPU stage. The output
has the columns of `pipeline.output.columns` plus ``input.passthrough_columns``. `build_processor`
is the one place where concurrency, GPUs and batch sizes are set; the CLI job
(`pipeline.job.runner`) is this processor between its reader and its committed writer.
Non-goals: reading, resume and exactly-once writes (the job's), and starting Ray.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
import yaml

from pipeline.io.inputs import check_columns, passthrough_schema
from pipeline.output.columns import check_passthrough_names
from pipeline.spec import JobSpec, ProcessorConfig
from pipeline.stages.answer import Answerer
from pipeline.stages.capacity import live_resources
from pipeline.stages.preprocess import Preprocess

logger = logging.getLogger(__name__)
RowFn = Callable[[dict[str, Any]], dict[str, Any]]


class Processor:
    """A lazy transform ``Dataset -> Dataset``: CPU preprocess, then model actors."""

    def __init__(
        self,
        config: ProcessorConfig,
        *,
        passthrough: pa.Schema | None = None,
        run_id: str | None = None,
        run_date: str | None = None,
        ledger: Any = None,
        preprocess: RowFn | None = None,
        postprocess: RowFn | None = None,
        preprocess_map_kwargs: dict[str, Any] | None = None,
        postprocess_map_kwargs: dict[str, Any] | None = None,
    ):
        self.config, self.passthrough, self.ledger = config, passthrough, ledger
        self.preprocess, self.postprocess = preprocess, postprocess
        self.preprocess_map_kwargs = preprocess_map_kwargs or {}
        self.postprocess_map_kwargs = postprocess_map_kwargs or {}
        self.run_date = run_date or dt.datetime.now(dt.UTC).date().isoformat()
        self.run_id = (
            run_id or f"processor-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
        )

    def __call__(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        """Add the answer and pruning-statistics columns to ``ds``'s rows (lazy: nothing of
        ``ds`` runs here)."""
        if self.preprocess is not None:
            ds = ds.map(self.preprocess, **self.preprocess_map_kwargs)
        check_passthrough_names(self.config.input)
        cfg = fit_to_cluster(self.config)
        ex = cfg.execution
        passthrough = self.passthrough if self.passthrough is not None else self._check(ds)
        # One model batch per block: in the job each model task's rows commit on their own,
        # so a crash loses at most the batches in flight, and the actor pool gets enough blocks.
        ds = ds.repartition(target_num_rows_per_block=ex.batch_size)
        ds = ds.map_batches(
            Preprocess,
            fn_constructor_kwargs={
                "spec": cfg,
                "passthrough": [cfg.input.output_name(c) for c in cfg.input.passthrough_columns],
                "check_columns": passthrough is None,
            },
            batch_size=ex.preprocess_batch_size,
            batch_format="pyarrow",
            num_cpus=1,
            compute=actor_pool(ex.preprocess_concurrency or (1, spare_cpus(cfg))),
            udf_modifying_row_count=False,
        )
        kwargs = {
            "spec": cfg,
            "run_id": self.run_id,
            "run_date": self.run_date,
            "passthrough": passthrough,
            "ledger": self.ledger,
        }
        with warnings.catch_warnings():  # the retry bounds below go through ray_remote_args
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            ds = _answer_stage(ds, cfg, kwargs)
        if self.postprocess is not None:
            ds = ds.map(self.postprocess, **self.postprocess_map_kwargs)
        return ds

    def _check(self, ds: ray.data.Dataset) -> pa.Schema | None:
        """The dataset's columns against the config when its plan knows them without running
        anything (``schema(fetch_if_missing=False)``); returns the pass-through columns'
        schema, or None (the CPU stage then checks the first block it gets)."""
        schema = ds.schema(fetch_if_missing=False)
        if schema is None:
            return None
        # Columns Ray cannot type in Arrow (pandas objects) are checked by name only (null).
        types = [t if isinstance(t, pa.DataType) else pa.null() for t in schema.types]
        arrow = pa.schema(list(zip(schema.names, types, strict=True)))
        check_columns("the dataset", arrow, self.config.input)
        return passthrough_schema(arrow, self.config.input)


def build_processor(
    config: ProcessorConfig | JobSpec | dict | str | Path,
    preprocess: RowFn | None = None,
    postprocess: RowFn | None = None,
    *,
    preprocess_map_kwargs: dict[str, Any] | None = None,
    postprocess_map_kwargs: dict[str, Any] | None = None,
    passthrough: pa.Schema | None = None,
    run_id: str | None = None,
    run_date: str | None = None,
    ledger: Any = None,
) -> Processor:
    """A processor from a `ProcessorConfig`, a job spec, a mapping or a YAML file of either.

    As in ``ray.data.llm.build_processor(config, preprocess, postprocess)``: ``preprocess``
    maps each input row to the row the stages read (id, image, question, pass-through
    columns), ``postprocess`` each output row to what the caller keeps; both run through
    ``Dataset.map`` with the given ``*_map_kwargs``. ``passthrough`` (types of the
    pass-through columns) is taken from the dataset's plan, else from the rows, when None.
    """
    return Processor(
        _config(config),
        passthrough=passthrough,
        run_id=run_id,
        run_date=run_date,
        ledger=ledger,
        preprocess=preprocess,
        postprocess=postprocess,
        preprocess_map_kwargs=preprocess_map_kwargs,
        postprocess_map_kwargs=postprocess_map_kwargs,
    )


def _config(config: ProcessorConfig | JobSpec | dict | str | Path) -> ProcessorConfig:
    if isinstance(config, (str, Path)):
        config = yaml.safe_load(Path(config).read_text())
    if isinstance(config, JobSpec):
        return ProcessorConfig.from_job(config)
    if isinstance(config, dict):
        if "output" in config or "name" in config:  # a job spec's mapping
            from pipeline.spec import parse_spec

            return ProcessorConfig.from_job(parse_spec(config))
        return ProcessorConfig.model_validate(config)
    return config


def _answer_stage(ds: ray.data.Dataset, cfg: ProcessorConfig, kwargs: dict) -> ray.data.Dataset:
    ex = cfg.execution
    retries = -1 if kwargs.get("ledger") is not None else ex.max_task_retries
    return ds.map_batches(
        Answerer,
        fn_constructor_kwargs=kwargs,
        batch_size=ex.batch_size,
        batch_format="pyarrow",
        num_gpus=ex.gpus_per_actor,
        num_cpus=ex.cpus_per_actor,
        compute=actor_pool(ex.actors),
        udf_modifying_row_count=False,
        # With the job's ledger, Ray Data's own defaults, spelled out: an actor whose node is
        # lost restarts on a surviving or replacement node and its batches wait for it,
        # however long node death takes to detect. The run bounds the rest itself: a poison
        # item is quarantined after three attempts, systemic exits by max_task_retries
        # (`stages.failures`), a wait for capacity by the watchdog. Without a ledger (the
        # stage API) nothing else would bound them: Ray's retries are (RELIABILITY.md §1.8).
        # Ray 2.60 has no named parameter for these.
        max_restarts=retries,
        max_task_retries=retries,
    )


def actor_pool(size: int | tuple[int, int]) -> ray.data.ActorPoolStrategy:
    """A fixed (int) or autoscaling ([min, max]) actor pool."""
    lo, hi = (size, size) if isinstance(size, int) else size
    return ray.data.ActorPoolStrategy(min_size=lo, max_size=hi)


def fit_to_cluster(cfg: ProcessorConfig, *, quiet: bool = False) -> ProcessorConfig:
    """The layout sized to the connected cluster's live nodes (`capacity.live_resources`):
    model actors left at the default ``execution.cpus_per_actor`` reserve no CPU when the
    cluster has too few for them plus one preprocessing actor and one read/write task (else Ray
    Data waits forever, "3/2 CPU"). A layout that still does not fit (an explicit setting, or
    fewer than 2 CPUs) is kept, with one warning: the cluster may grow. ``quiet`` logs
    at debug level only (a second look at the same layout)."""
    ex = cfg.execution
    if not ray.is_initialized():
        return cfg
    total = live_resources().get("CPU", 0)
    actors = ex.actors if isinstance(ex.actors, int) else ex.actors[0]
    if total >= actors * ex.cpus_per_actor + 2:  # one preprocessing actor, one read/write task
        return cfg
    if "cpus_per_actor" not in ex.model_fields_set and ex.cpus_per_actor > 0:
        (logger.debug if quiet else logger.info)(
            "the Ray cluster has %g CPU(s): model actors reserve none (execution.cpus_per_actor "
            "0 instead of the default 1), leaving them for preprocessing and reading",
            total,
        )
        ex = ex.model_copy(update={"cpus_per_actor": 0.0})
        cfg = cfg.model_copy(update={"execution": ex})
        if total >= 2:
            return cfg
    reserved = actors * ex.cpus_per_actor
    (logger.debug if quiet else logger.warning)(
        "the Ray cluster has %g CPU(s); the model actors reserve %g, preprocessing and reading "
        "need 2 more, so the run may stall until the cluster grows: %s",
        total,
        reserved,
        _more_cpus_hint(int(reserved + 2)),
    )
    return cfg


def _more_cpus_hint(needed: int) -> str:
    """What to change: ray.init's CPUs only when this process started Ray itself."""
    node = getattr(ray._private.worker, "_global_node", None)
    started_here = node is not None and getattr(node, "head", False)
    if started_here:
        return (
            f"start Ray with more CPUs (ray.init(num_cpus={needed})) or lower "
            "execution.cpus_per_actor"
        )
    return (
        f"give the cluster {needed} CPU(s) or more (ray start --num-cpus, or more workers), or "
        "lower execution.cpus_per_actor"
    )


def spare_cpus(cfg: ProcessorConfig | JobSpec) -> int:
    """CPU actors for preprocessing: what the model actors leave, minus one for read/write."""
    ex = cfg.execution
    actors = ex.actors if isinstance(ex.actors, int) else ex.actors[1]
    total = live_resources().get("CPU", 1) if ray.is_initialized() else 1
    return max(1, int(total - actors * ex.cpus_per_actor - 1))
