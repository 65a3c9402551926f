"""Read a job's output for the cost report: result Parquet files and `_runs/*.json` summaries.

Works on a local folder or an `s3://` prefix through fsspec (the endpoint comes from
`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`; credentials only from the environment). A prefix
is either one night's output or a parent holding `run_date=...` partitions (one per night).
Only the columns the report needs are read, cast to fixed types; optional columns that a
file lacks come back as nulls. Non-goals: any computation on the rows (see `stats.py`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

STRING_COLUMNS = (
    "id",
    "question",
    "answer",
    "status",
    "error_cause",
    "model",
    "pruner",
    "keep",
    "shadow_answer",
    "shadow_error",
    "batch_id",
    "run_id",
    "run_date",
)
FLOAT_COLUMNS = (
    "visual_tokens",
    "kept_tokens",
    "retained_energy",
    "prompt_tokens",
    "prompt_tokens_unpruned",
    "new_tokens",
    "gpu_seconds",
    "batch_size",
    "failed_gpu_seconds",
    "preprocess_s",
    "vision_s",
    "select_s",
    "generate_s",
    "shadow_gpu_seconds",
    "shadow_new_tokens",
    "shadow_prompt_tokens",
)
BOOL_COLUMNS = ("shadow",)
SHADOW_ONLY_TEXT = ("question", "answer", "shadow_answer")
NIGHT_PREFIX = "run_date="


class ReportInputError(RuntimeError):
    """The output prefix cannot be reported on (missing, unreadable, or holds no run)."""


@dataclass
class Night:
    """One night's output: its rows (column name -> numpy array) and its run summaries."""

    uri: str
    run_date: str | None
    columns: dict[str, np.ndarray]
    runs: list[dict[str, Any]] = field(default_factory=list)
    duplicate_ids: int = 0
    markers: int = 0  # commit markers under _manifest/ (a job's output has them)

    @property
    def rows(self) -> int:
        """Number of result rows (after dropping duplicate ids)."""
        return len(self.columns["id"])


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and bare path of a local or s3:// URI (listing cache off)."""
    options: dict[str, Any] = {}
    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        options = {"use_listings_cache": False, "skip_instance_cache": True}
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path.rstrip("/")


def _join(uri: str, name: str) -> str:
    return uri.rstrip("/") + "/" + name


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _is_hidden(relative: str) -> bool:
    return any(part.startswith(("_", ".")) for part in relative.split("/") if part)


def _result_files(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    found = fs.find(root, detail=True) if fs.exists(root) else {}
    files = [p for p, info in found.items() if info.get("type") == "file"]
    relative = {p: p[len(root) :].strip("/") for p in files}  # "" is an S3 folder marker
    keep = [p for p, rel in relative.items() if rel and not _is_hidden(rel)]
    return sorted(p for p in keep if NIGHT_PREFIX not in relative[p])


def _typed(table: pa.Table, name: str, kind: pa.DataType) -> pa.Array:
    if name not in table.column_names:
        return pa.nulls(table.num_rows, kind)
    column = table.column(name).combine_chunks()
    return column if column.type == kind else pc.cast(column, kind)


def _read_file(fs: fsspec.AbstractFileSystem, path: str) -> pa.Table:
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        wanted = set(STRING_COLUMNS + FLOAT_COLUMNS + BOOL_COLUMNS)
        table = parquet.read(columns=[n for n in parquet.schema_arrow.names if n in wanted])
    kinds = [(n, pa.string()) for n in STRING_COLUMNS] + [(n, pa.float64()) for n in FLOAT_COLUMNS]
    kinds += [(n, pa.bool_()) for n in BOOL_COLUMNS]
    try:
        arrays = {name: _typed(table, name, kind) for name, kind in kinds}
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ReportInputError(f"{path}: a column has an unexpected type ({exc})") from exc
    shadow = pc.fill_null(arrays["shadow"], False)
    for name in SHADOW_ONLY_TEXT:  # only the shadow sample's texts are ever shown
        arrays[name] = pc.if_else(shadow, arrays[name], pa.scalar(None, pa.string()))
    return pa.table(arrays)


def _to_numpy(table: pa.Table) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name in table.column_names:
        column = table.column(name)
        if name in FLOAT_COLUMNS:
            out[name] = pc.fill_null(column, np.nan).to_numpy().astype(np.float64)
        elif name in BOOL_COLUMNS:
            out[name] = pc.fill_null(column, False).to_numpy(zero_copy_only=False).astype(bool)
        else:
            out[name] = np.asarray(column.to_pylist(), dtype=object)
    return out


def _dedupe(columns: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """Keep the last row of each id (a resumed run rewrote it); return the number dropped."""
    ids = columns["id"]
    if len(ids) == 0:
        return columns, 0
    _, last = np.unique(ids[::-1].astype(str), return_index=True)
    keep = np.sort(len(ids) - 1 - last)
    return {k: v[keep] for k, v in columns.items()}, len(ids) - len(keep)


def read_runs(fs: fsspec.AbstractFileSystem, root: str) -> list[dict[str, Any]]:
    """All `_runs/*.json` summaries under one night, oldest first."""
    runs = []
    for path in sorted(fs.glob(_join(root, "_runs/*.json"))):
        with fs.open(path, "rb") as handle:
            try:
                runs.append(json.load(handle))
            except json.JSONDecodeError as exc:
                raise ReportInputError(f"{path}: not valid JSON ({exc})") from exc
    return sorted(runs, key=lambda r: (str(r.get("started_at") or ""), str(r.get("run_id"))))


def read_night(fs: fsspec.AbstractFileSystem, root: str, uri: str) -> Night:
    """Read one night's results and run summaries."""
    tables = [_read_file(fs, path) for path in _result_files(fs, root)]
    table = pa.concat_tables(tables) if tables else _read_empty()
    columns, dropped = _dedupe(_to_numpy(table))
    runs = read_runs(fs, root)
    name = _basename(root)
    run_date = name[len(NIGHT_PREFIX) :] if name.startswith(NIGHT_PREFIX) else None
    if run_date is None:
        dates = [str(r["run_date"]) for r in runs if r.get("run_date")]
        dates += sorted({str(d) for d in columns["run_date"] if d})
        run_date = dates[-1] if dates else None
    markers = len(fs.glob(_join(root, "_manifest/*")))
    return Night(uri, run_date, columns, runs, dropped, markers)


def _read_empty() -> pa.Table:
    names = list(STRING_COLUMNS + FLOAT_COLUMNS + BOOL_COLUMNS)
    kinds = [pa.string()] * len(STRING_COLUMNS) + [pa.float64()] * len(FLOAT_COLUMNS)
    kinds += [pa.bool_()] * len(BOOL_COLUMNS)
    return pa.table([pa.array([], k) for k in kinds], names=names)


def load_output(uri: str) -> list[Night]:
    """Every night under a prefix (one when the prefix is itself a night), by run date."""
    fs, root = filesystem(uri)
    if not fs.exists(root):
        raise ReportInputError(f"{uri}: no such output folder or prefix")
    dirs = sorted(p.rstrip("/") for p in fs.ls(root, detail=False))
    dirs = [p for p in dirs if _basename(p).startswith(NIGHT_PREFIX)]
    if dirs:
        nights = [read_night(fs, p, _join(uri, _basename(p))) for p in dirs]
    else:
        nights = [read_night(fs, root, uri)]
    nights = [n for n in nights if n.runs or n.markers]
    if not nights:
        raise ReportInputError(
            f"{uri}: not a job's output (no _runs/*.json summaries and no _manifest/ commit "
            "markers); give the output.uri a run wrote"
        )
    return sorted(nights, key=lambda n: n.run_date or "")


def write_text(uri: str, name: str, text: str | bytes) -> str:
    """Write one file under `<uri>/_report/` and return its URI."""
    fs, root = filesystem(uri)
    target = _join(uri, f"_report/{name}")
    fs.makedirs(_join(root, "_report"), exist_ok=True)
    data = text.encode() if isinstance(text, str) else text
    with fs.open(_join(root, f"_report/{name}"), "wb") as handle:
        handle.write(data)
    return target
