"""Plan a run: list input shards, check them, and subtract what the output already holds.

Runs on the driver before Ray or any model is touched, so whole-job problems (unreachable
storage, no input files, missing columns, duplicate or null ids, no write access) fail
fast with one line. Reads only each file's footer and id column. Shards whose ids are all
committed are dropped from the read; partly committed shards get a row filter.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline import commit, inputs
from pipeline.spec import InputSpec, JobSpec, fingerprint
from pipeline.storage import StorageError, filesystem, join, redact


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
    input_format: str = "parquet"
    image_encoding: str = "encoded bytes"
    bad_shards: dict[str, str] = field(default_factory=dict)  # unreadable shard -> why
    dataset_folder: str = ""

    @property
    def items_pending(self) -> int:
        """Items this run will process."""
        return self.items_total - self.items_skipped


def make_plan(spec: JobSpec, *, run_id: str | None = None) -> Plan:
    """Check input, then output storage, and compute the pending work; raises StorageError.

    With ``run_id`` (a run, not a validation) the run takes the output prefix's lease first.
    """
    in_fs, in_path = filesystem(spec.input.uri, spec.storage)
    out_fs, out_root = filesystem(spec.output.uri, spec.storage)
    try:
        listing = inputs.list_input(in_fs, in_path, spec.input)
        folder = inputs.dataset_folder(in_fs, in_path, spec.input.uri)
        _probe_write(out_fs, out_root)
        if run_id is not None:
            commit.take_lease(out_fs, out_root, run_id)
        recovered = commit.recover(out_fs, out_root)
        _check_fingerprint(out_fs, out_root, fingerprint(spec))
        done = commit.committed_ids(out_fs, out_root)
    except OSError as exc:
        raise StorageError(f"storage unreachable or refused: {redact(str(exc))}") from None
    pending, skip, total, skipped = [], [], 0, 0
    for path, ids in listing.ids.items():
        total += len(ids)
        hit = [i for i in ids if i in done]
        skipped += len(hit)
        if len(hit) < len(ids):
            pending.append(path)
            skip += hit
    return Plan(
        in_fs, out_fs, out_root, len(listing.files) + len(listing.bad_shards), pending, total,
        skipped, skip, recovered_files=recovered, **_input_fields(listing, spec.input, folder),
    )  # fmt: skip


def _input_fields(listing: inputs.InputListing, spec: InputSpec, folder: str) -> dict:
    """The plan's fields that describe the input (format, columns, image encoding)."""
    schema, question = listing.schema, spec.question_column
    return {
        "passthrough": pa.schema([schema.field(c) for c in spec.passthrough_columns]),
        "has_question": bool(question) and question in schema.names,
        "input_format": listing.format, "image_encoding": listing.image_encoding,
        "bad_shards": listing.bad_shards, "dataset_folder": folder,
    }  # fmt: skip


def _check_fingerprint(fs: pafs.FileSystem, root: str, current: str) -> None:
    """Refuse to resume into output written with another model/pruning/input config."""
    other = {m.get("spec_fingerprint") for m in commit.manifest_stats(fs, root)} - {current}
    if other:
        found = sorted(map(str, other))[0]
        raise StorageError(
            f"{root} holds results of a different job config (fingerprint {found} != {current});"
            " write to a new output prefix instead of mixing answers"
        )


def _probe_write(fs: pafs.FileSystem, root: str) -> None:
    """Fail fast when the output prefix is not writable (one tiny object, then deleted)."""
    probe = join(root, commit.RUNS, f".probe-{uuid.uuid4().hex}")
    fs.create_dir(join(root, commit.RUNS), recursive=True)
    with fs.open_output_stream(probe) as f:
        f.write(b"ok")
    fs.delete_file(probe)
