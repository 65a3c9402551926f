"""Read the plan's pending input files as a lazy Ray Dataset of the job's rows.

Each format goes through a Ray Data reader: ``read_parquet`` (its V1 path, see
`read_parquet_files`; no hive-partition columns are invented from paths), a
`FileBasedDatasource` over pyarrow's Arrow IPC stream reader for ``datasets`` ``save_to_disk``
folders, and ``read_webdataset`` (members kept as bytes, then shaped into rows by
`pipeline.io.webdataset.to_rows`). Only the columns the job needs are kept.
Integer ids become their decimal strings here, so everything after the reader (resume,
filters, the output) sees text. Non-goals: checks and ids (the plan did them), decoding
(the CPU stage does it).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import pyarrow as pa
import pyarrow.fs as pafs
import ray
from ray.data.datasource import FileBasedDatasource

from pipeline.filters import apply_filter, filter_columns
from pipeline.io import webdataset
from pipeline.spec import InputSpec


class ArrowStreamDatasource(FileBasedDatasource):
    """Arrow IPC stream files (what ``Dataset.save_to_disk`` writes), keeping ``columns``."""

    def __init__(self, paths: list[str], *, columns: list[str], **kwargs):
        super().__init__(paths, file_extensions=["arrow"], **kwargs)
        self.columns = columns

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        for batch in pa.ipc.open_stream(f):
            yield pa.Table.from_batches([batch]).select(self.columns)


class PendingInput(Protocol):
    """What the reader needs of the job's plan (``pipeline.job.plan.Plan`` has it)."""

    pending_files: list[str]
    in_fs: pafs.FileSystem
    input_format: str
    has_question: bool
    integer_ids: bool


def read_input(spec: InputSpec, plan: PendingInput) -> ray.data.Dataset:
    """The pending files' rows: id, image, question (when present), pass-through columns."""
    files, fs = plan.pending_files, plan.in_fs
    if plan.input_format == "webdataset":
        samples = ray.data.read_webdataset(files, filesystem=fs, decoder=None)
        return samples.map_batches(
            webdataset.to_rows, fn_kwargs={"spec": spec}, batch_format="pyarrow", batch_size=None
        )
    cols = [spec.id_column, spec.image_column or spec.image_uri_column, *spec.passthrough_columns]
    if plan.has_question:
        cols.append(spec.question_column)
    cols = list(dict.fromkeys(cols))
    read = list(dict.fromkeys(cols + (filter_columns(spec.filter) if spec.filter else [])))
    if plan.input_format == "datasets":
        ds = ray.data.read_datasource(ArrowStreamDatasource(files, columns=read, filesystem=fs))
    else:
        ds = read_parquet_files(files, fs, read)
    if spec.filter:
        ds = ds.map_batches(
            _keep_rows, fn_kwargs={"text": spec.filter, "columns": cols}, batch_format="pyarrow"
        )
    if plan.integer_ids:
        ds = ds.map_batches(text_ids, batch_format="pyarrow", fn_kwargs={"column": spec.id_column})
    return ds


def read_parquet_files(
    files: list[str], fs: pafs.FileSystem, columns: list[str]
) -> ray.data.Dataset:
    """``read_parquet`` of the listed files through Ray Data's V1 path (read tasks only).

    The V2 path (Ray 2.60's default) provisions a pool of 32 ``FooterReader`` actors per read,
    each a worker process that needs a free CPU to be placed: on a small cluster whose CPUs the
    job's actors reserve the listing waits for one, and on 2 cores the pool cost ~5 s of a
    3-item run. The plan already listed the files, so nothing of V2's listing is needed. The
    caller's ``DataContext`` setting is restored.
    """
    ctx = ray.data.DataContext.get_current()
    was, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        return ray.data.read_parquet(files, filesystem=fs, columns=columns, partitioning=None)
    finally:
        ctx.use_datasource_v2 = was


def _keep_rows(batch: pa.Table, *, text: str, columns: list[str]) -> pa.Table:
    """The rows input.filter keeps (the plan counted the same), the job's columns only."""
    return apply_filter(batch, text).select(columns)


def text_ids(batch: pa.Table, *, column: str) -> pa.Table:
    """Integer ids as their decimal strings (what the output's id column and resume hold)."""
    at = batch.schema.get_field_index(column)
    return batch.set_column(at, column, batch.column(column).cast(pa.string()))
