"""Plan a run: list input shards, check them, and subtract what the output already holds.

Runs on the driver before Ray or any model is touched, so whole-job problems (unreachable
storage, no input files, missing columns, duplicate or null ids, a bad model path, output of
another config, no write access) fail fast with one line, and all but the last before the
output prefix is touched. Reads only each file's footer and id column. Shards whose ids are all
committed are dropped from the read; partly committed shards get a row filter.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import commit, prefix
from pipeline.checks import check_model_path
from pipeline.columns import OUTPUT_COLUMNS
from pipeline.spec import InputSpec, JobSpec, fingerprint, fingerprint_fields
from pipeline.storage import StorageError, filesystem, join, list_files, redact


@dataclass
class Plan:
    """What this run reads: pending shards and the committed ids to filter out of them."""

    in_fs: pafs.FileSystem
    out_fs: pafs.FileSystem
    out_root: str
    files_total: int
    pending_files: list[str]
    items_total: int
    items_skipped: int
    skip_ids: list[str] = field(default_factory=list)
    passthrough: pa.Schema = field(default_factory=lambda: pa.schema([]))
    has_question: bool = True
    recovered_files: int = 0

    @property
    def items_pending(self) -> int:
        """Items this run will process."""
        return self.items_total - self.items_skipped


def make_plan(spec: JobSpec, *, run_id: str | None = None) -> Plan:
    """Check input, model path and output, then compute the pending work.

    Every read-only check (input files and columns, model path, the output prefix's markers
    and fingerprint) runs first and raises StorageError / ModelPathError. Only with
    ``run_id`` (a run, not a validation) does it then write: a probe, the prefix's lease, and
    recovery. Without ``run_id`` nothing is written. The output is listed once per phase.
    """
    in_fs, in_path = filesystem(spec.input.uri, spec.storage)
    out_fs, out_root = filesystem(spec.output.uri, spec.storage)
    try:
        files = list_files(in_fs, in_path, ".parquet")
        if not files:
            raise StorageError(f"no Parquet files under {spec.input.uri}")
        per_file, schema = _read_ids(in_fs, files, spec.input)
        check_model_path(spec)
        state = prefix.scan(out_fs, out_root)
        commit.check_unmarked(state)
        check_fingerprint(state, spec)
        recovered = 0
        if run_id is not None:
            _probe_write(out_fs, out_root)
            commit.take_lease(out_fs, out_root, run_id)
            state = prefix.scan(out_fs, out_root, known=state.markers)
            recovered = commit.recover(out_fs, out_root, state)
        done = prefix.all_ids(out_fs, state)
    except OSError as exc:
        raise StorageError(f"storage unreachable or refused: {redact(str(exc))}") from None
    pending, skip, total, skipped = [], [], 0, 0
    for path, ids in per_file.items():
        total += len(ids)
        hit = [i for i in ids if i in done]
        skipped += len(hit)
        if len(hit) < len(ids):
            pending.append(path)
            skip += hit
    question = spec.input.question_column
    return Plan(
        in_fs, out_fs, out_root, len(files), pending, total, skipped, skip,
        passthrough=pa.schema([schema.field(c) for c in spec.input.passthrough_columns]),
        has_question=bool(question) and question in schema.names, recovered_files=recovered,
    )  # fmt: skip


def _read_ids(
    fs: pafs.FileSystem, files: list[str], spec: InputSpec
) -> tuple[dict[str, list[str]], pa.Schema]:
    """Each file's ids, after checking columns, types and uniqueness across files."""
    per_file: dict[str, list[str]] = {}
    seen: set[str] = set()
    schema = pa.schema([])
    for path in files:
        try:
            pf = pq.ParquetFile(fs.open_input_file(path))
        except (OSError, pa.ArrowInvalid) as exc:
            raise StorageError(f"cannot read input {path}: {redact(str(exc))}") from None
        schema = pf.schema_arrow
        _check_columns(path, schema, spec)
        ids = pf.read(columns=[spec.id_column]).column(0).to_pylist()
        if any(i is None or i == "" for i in ids):
            raise StorageError(f"{path}: column {spec.id_column!r} has null or empty ids")
        dup = seen.intersection(ids) or (len(set(ids)) < len(ids) and {"(within the file)"})
        if dup:
            raise StorageError(
                f"{path}: duplicate ids in {spec.id_column!r}, e.g. {sorted(dup)[0]}"
            )
        seen.update(ids)
        per_file[path] = ids
    return per_file, schema


def _check_columns(path: str, schema: pa.Schema, spec: InputSpec) -> None:
    image_col = spec.image_column or spec.image_uri_column
    needed = [spec.id_column, image_col, *spec.passthrough_columns]
    missing = [c for c in needed if c not in schema.names]
    if missing:
        raise StorageError(f"{path}: missing column(s) {missing}; it has {schema.names}")
    expected = {spec.id_column: _is_text, spec.question_column: _is_text,
                spec.image_uri_column: _is_text, spec.image_column: _is_bytes}  # fmt: skip
    wrong = [f"{c} ({schema.field(c).type})" for c, ok in expected.items()
             if c and c in schema.names and not ok(schema.field(c).type)]  # fmt: skip
    if wrong:
        raise StorageError(f"{path}: wrong column type(s) {wrong}: ids, questions and URIs are "
                           "strings, images are binary")  # fmt: skip
    clash = sorted(set(spec.passthrough_columns) & {name for name, _, _ in OUTPUT_COLUMNS})
    if clash:
        raise StorageError(f"passthrough column(s) {clash} clash with output columns")


def check_fingerprint(state: prefix.PrefixState, spec: JobSpec) -> None:
    """Refuse to resume into output written with another model/pruning/input config, naming
    the fields that differ and how to proceed."""
    current = fingerprint(spec)
    other = [m for m in state.markers.values() if m.get("spec_fingerprint") != current]
    if not other:
        return
    theirs, ours = other[0].get("spec_fields") or {}, fingerprint_fields(spec)
    keys = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    diff = [f"{k} ({_show(ours.get(k))} now, {_show(theirs.get(k))} there)" for k in keys]
    fields = "; ".join(diff) if theirs else "(not recorded by the version that wrote it)"
    raise StorageError(
        f"{state.root} holds results of a different job config (fingerprint "
        f"{other[0].get('spec_fingerprint')} != {current}); differing fields: {fields}. "
        "Write to a new output.uri, or rerun with the settings that wrote it."
    )


def _show(value: object) -> str:
    return "unset" if value is None else repr(value)


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_bytes(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _probe_write(fs: pafs.FileSystem, root: str) -> None:
    """Fail fast when the output prefix is not writable (one tiny object, then deleted)."""
    probe = join(root, commit.RUNS, f".probe-{uuid.uuid4().hex}")
    fs.create_dir(join(root, commit.RUNS), recursive=True)
    with fs.open_output_stream(probe) as f:
        f.write(b"ok")
    fs.delete_file(probe)
