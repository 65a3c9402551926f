"""The job's input on the driver: detect its format, list its files, check columns, read ids.

Three formats, one result (`InputListing`): Parquet files (ours, or a Hugging Face hub
``data/*.parquet`` layout), a ``datasets`` ``save_to_disk`` folder (`pipeline.io.hf_arrow`), and
WebDataset tar shards (`pipeline.io.webdataset`). Image columns may hold encoded bytes or the
``datasets`` ``Image()`` struct ``{bytes, path}`` (detected from the type). Reads only what the
plan needs (footers and id columns; a tar shard's member headers). Non-goals: reading rows for
the job (`pipeline.io.readers`), and resume (`pipeline.job.plan`).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.filters import apply_filter, filter_columns
from pipeline.io import hf_arrow, webdataset
from pipeline.io.storage import StorageError, is_remote, list_files, redact
from pipeline.spec import ColumnsSpec, InputSpec

SUFFIX = {"parquet": ".parquet", "webdataset": ".tar"}
HF_IMAGE = "datasets Image() struct {bytes, path}"
LISTING_THREADS = 8  # tar shards listed at once on the driver (I/O bound)


@dataclass
class InputListing:
    """The input's readable files with their ids, its column types, and unreadable shards."""

    format: str
    files: list[str]
    ids: dict[str, list[str]]
    schema: pa.Schema
    image_encoding: str
    bad_shards: dict[str, str] = field(default_factory=dict)
    filtered_out: int = 0  # rows input.filter dropped (not counted, never read for the job)


def list_input(fs: pafs.FileSystem, path: str, spec: InputSpec) -> InputListing:
    """Detect the format, check every file's columns and ids; raises StorageError."""
    fmt, files = detect(fs, path, spec)
    if fmt == "webdataset":
        if spec.filter:
            raise StorageError(
                "input.filter applies to Parquet and datasets inputs, not WebDataset"
            )
        return _list_webdataset(fs, files, spec)
    per_file: dict[str, list[str]] = {}
    schema, dropped = pa.schema([]), 0
    for file in files:
        schema, ids, n = _schema_and_ids(fmt, fs, file, spec)
        per_file[file], dropped = ids, dropped + n
    check_ids(per_file, spec.id_column)
    listing = InputListing(fmt, files, per_file, schema, image_encoding(schema, spec))
    listing.filtered_out = dropped
    return listing


def detect(fs: pafs.FileSystem, path: str, spec: InputSpec) -> tuple[str, list[str]]:
    """The input format (spec.format, or detected) and its data files, in order."""
    found = list_files(fs, path)
    if not found and not any(c in path for c in "*?[") and not _exists(fs, path):
        raise StorageError(f"input.uri {spec.uri} does not exist")
    fmt = spec.format
    if fmt == "auto":
        fmt = "parquet"
        if any(f.endswith(".tar") for f in found):
            fmt = "webdataset"
        elif any(hf_arrow.is_state_file(f) for f in found):
            fmt = "datasets"
    if spec.split is not None and fmt != "datasets":
        raise StorageError(
            f"input.split applies to a datasets save_to_disk DatasetDict; {spec.uri} holds {fmt}"
        )
    if fmt == "datasets":
        states = [f for f in found if hf_arrow.is_state_file(f)]
        files = hf_arrow.data_files(fs, hf_arrow.one_split(states, path, spec.split, spec.uri))
    else:
        files = [f for f in found if f.endswith(SUFFIX[fmt])]
    if not files:
        what = {
            "parquet": "Parquet files",
            "webdataset": "WebDataset .tar shards",
            "datasets": "datasets save_to_disk folder (state.json)",
        }
        if spec.format == "auto":
            raise StorageError(f"no {', '.join(what.values())} under {spec.uri}")
        raise StorageError(f"no {what[fmt]} under {spec.uri} (input.format: {fmt})")
    return fmt, files


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _schema_and_ids(
    fmt: str, fs: pafs.FileSystem, path: str, spec: InputSpec
) -> tuple[pa.Schema, list[str], int]:
    """A file's schema, the ids input.filter keeps, and how many rows it dropped."""

    def check(where: str, schema: pa.Schema) -> None:
        check_columns(where, schema, spec)

    columns = list(dict.fromkeys([spec.id_column, *_filter_columns(spec)]))
    if fmt == "datasets":
        schema, table = hf_arrow.read_schema_and_columns(fs, path, columns, check)
    else:
        pf = _parquet(fs, path)
        check(path, pf.schema_arrow)
        schema, table = pf.schema_arrow, pf.read(columns=columns)
    kept = _filtered(path, table, spec.filter)
    ids = [str(i) if isinstance(i, int) else i for i in kept.column(spec.id_column).to_pylist()]
    return schema, ids, table.num_rows - kept.num_rows  # integer ids as text


def _filter_columns(spec: InputSpec) -> list[str]:
    return filter_columns(spec.filter) if spec.filter else []


def _filtered(path: str, table: pa.Table, text: str | None) -> pa.Table:
    try:
        return apply_filter(table, text)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise StorageError(f"{path}: input.filter {text!r} cannot apply: {exc}") from None


def _parquet(fs: pafs.FileSystem, path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(fs.open_input_file(path))
    except (OSError, pa.ArrowInvalid) as exc:
        raise StorageError(f"cannot read input {path}: {redact(str(exc))}") from None


def check_schema(fs: pafs.FileSystem, path: str, spec: InputSpec) -> tuple[str, pa.Schema | None]:
    """Format and columns from the files' metadata alone (Parquet footers, Arrow stream
    schemas; no rows, no ids): a line saying what was found, and the last file's schema (None
    for WebDataset, whose members are only known by reading the shards)."""
    fmt, files = detect(fs, path, spec)
    if fmt == "webdataset":
        return f"input: webdataset, {len(files)} shard(s); samples are read by --deep", None
    schema = pa.schema([])
    for file in files:
        schema = (
            hf_arrow.read_schema(fs, file) if fmt == "datasets" else _parquet(fs, file).schema_arrow
        )
        check_columns(file, schema, spec)
    line = f"input: {fmt}, {len(files)} file(s); images: {image_encoding(schema, spec)}"
    return line + " (columns from metadata; ids and rows are read by --deep)", schema


def _list_webdataset(fs: pafs.FileSystem, files: list[str], spec: InputSpec) -> InputListing:
    if spec.image_uri_column:
        raise StorageError(
            "WebDataset input takes images from the image member; unset input.image_uri_column"
        )
    with ThreadPoolExecutor(max_workers=LISTING_THREADS) as pool:  # shards stream in parallel
        listed = list(pool.map(lambda f: _keys_or_error(fs, f), files))
    per_file = {f: keys for f, keys in zip(files, listed, strict=True) if isinstance(keys, list)}
    bad = {f: why for f, why in zip(files, listed, strict=True) if isinstance(why, str)}
    check_ids(per_file, "the sample key")
    return InputListing(
        "webdataset",
        list(per_file),
        per_file,
        webdataset.row_schema(spec),
        webdataset.image_encoding(spec),
        bad,
    )


def _keys_or_error(fs: pafs.FileSystem, path: str) -> list[str] | str:
    try:
        return webdataset.sample_keys(fs, path)
    except webdataset.ShardError as exc:
        return redact(str(exc))


def check_ids(per_file: dict[str, list[str]], column: str) -> None:
    """Ids are non-empty and unique across all files."""
    seen: set[str] = set()
    for path, ids in per_file.items():
        if any(i is None or i == "" for i in ids):
            raise StorageError(f"{path}: column {column!r} has null or empty ids")
        dup = seen.intersection(ids) or (len(set(ids)) < len(ids) and {"(within the file)"})
        if dup:
            raise StorageError(f"{path}: duplicate ids in {column!r}, e.g. {sorted(dup)[0]}")
        seen.update(ids)


def check_columns(path: str, schema: pa.Schema, spec: ColumnsSpec) -> None:
    """The spec's columns exist with usable types (a question column the spec names too);
    pass-through ones do not clash."""
    image_col = spec.image_column or spec.image_uri_column
    needed = [spec.id_column, image_col, *spec.passthrough_columns]
    needed += _filter_columns(spec) if isinstance(spec, InputSpec) else []
    missing = [c for c in needed if c not in schema.names]
    if missing:
        raise StorageError(f"{path}: missing column(s) {missing}; it has {schema.names}")
    named = "question_column" in spec.model_fields_set and spec.question_column
    if named and spec.question_column not in schema.names:
        raise StorageError(
            f"{path}: input.question_column {spec.question_column!r} is not a column (it has "
            f"{schema.names}); name one that is, or set it to null to ask every row "
            "model.default_question"
        )
    expected = {
        spec.id_column: _is_id,
        spec.question_column: _is_text,
        spec.image_uri_column: _is_text,
        spec.image_column: _is_image,
    }
    wrong = [
        f"{c} ({schema.field(c).type})"
        for c, ok in expected.items()
        if c and c in schema.names and not _null_or(ok, schema.field(c).type)
    ]
    if wrong:
        raise StorageError(
            f"{path}: wrong column type(s) {wrong}: ids are strings or integers, questions "
            f"and URIs are strings, images are binary or the {HF_IMAGE}"
        )


def passthrough_schema(schema: pa.Schema, spec: ColumnsSpec) -> pa.Schema:
    """The pass-through columns' fields under their output names."""
    return pa.schema(
        [schema.field(c).with_name(spec.output_name(c)) for c in spec.passthrough_columns]
    )


def image_encoding(schema: pa.Schema, spec: InputSpec) -> str:
    """How the rows carry images: encoded bytes, the datasets struct, or paths."""
    if spec.image_uri_column:
        return f"paths in column {spec.image_uri_column!r}"
    typ = schema.field(spec.image_column).type
    kind = HF_IMAGE if pa.types.is_struct(typ) else "encoded bytes"
    return f"{kind} in column {spec.image_column!r}"


def dataset_folder(fs: pafs.FileSystem, path: str, uri: str) -> str:
    """The input's folder as a URI (a file's or a glob's parent): relative image paths
    resolve against it."""
    if any(c in path for c in "*?["):
        path = path[: min(path.find(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
    elif fs.get_file_info(path).type == pafs.FileType.File:
        path = path.rsplit("/", 1)[0]
    return f"s3://{path}" if is_remote(uri) else path


def _null_or(ok: Callable[[pa.DataType], bool], t: pa.DataType) -> bool:
    """All-null columns (or ones Ray cannot type) have no type to refuse."""
    return pa.types.is_null(t) or ok(t)


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_id(t: pa.DataType) -> bool:
    """Strings, or integers (the hub's question ids; written out as decimal strings)."""
    return _is_text(t) or pa.types.is_integer(t)


def _is_bytes(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_image(t: pa.DataType) -> bool:
    """Encoded bytes, a struct with binary ``bytes`` (and string ``path``) fields, or Ray
    Data's tensor / pickled-object columns (``read_images`` arrays, a user's PIL rows)."""
    if isinstance(t, pa.ExtensionType):
        return t.extension_name.startswith("ray.data.")
    if not pa.types.is_struct(t):
        return _is_bytes(t)
    fields = {t.field(i).name: t.field(i).type for i in range(t.num_fields)}
    path_ok = "path" not in fields or _is_text(fields["path"])
    return "bytes" in fields and _is_bytes(fields["bytes"]) and path_ok
