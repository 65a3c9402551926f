"""Plan a run: list input shards, check them, and subtract what the output already holds.

Runs on the driver before Ray or any model is touched, so whole-job problems (unreachable
storage, no input files, missing columns (a named question column included), output inside
the input, duplicate or null ids, a bad model path, output of
another config, no write access) fail fast with one line, and all but the last before the
output prefix is touched. Reads only each file's footer and id column. Shards whose ids are all
committed are dropped from the read; partly committed shards get a row filter. The input's
formats and column checks are `pipeline.io.inputs`'.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline import faults
from pipeline.io import inputs
from pipeline.io.storage import StorageError, filesystem, join, redact
from pipeline.job.checks import check_model_path, check_output_outside_input
from pipeline.output import commit, prefix
from pipeline.output.columns import check_passthrough_names
from pipeline.spec import InputSpec, JobSpec, fingerprint, fingerprint_fields


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
    items_filtered: int = 0  # input rows input.filter dropped before counting
    integer_ids: bool = False  # the id column holds integers: read as their decimal strings

    @property
    def items_pending(self) -> int:
        """Items this run will process."""
        return self.items_total - self.items_skipped


@dataclass
class Facts:
    """What planning reads, once: the input's listing and the output prefix's scan."""

    in_fs: pafs.FileSystem
    out_fs: pafs.FileSystem
    out_root: str
    listing: inputs.InputListing
    folder: str  # the datasets folder ("" for other formats)
    state: prefix.PrefixState
    recovered_files: int = 0


def make_plan(spec: JobSpec, *, run_id: str | None = None) -> Plan:
    """Check input, model path and output, then compute the pending work.

    In one direction: read-only facts first (one listing of the input, one scan of the output
    prefix, the fingerprint check), raising StorageError / ModelPathError; then, only with
    ``run_id`` (a run, not a validation), the writes (a probe, the prefix's lease, recovery of
    a crashed run's staged files); then the decision, a pure function of the facts. Without
    ``run_id`` nothing is written.
    """
    try:
        facts = read_facts(spec)
        if run_id is not None:
            facts = claim_output(facts, run_id)
        done = prefix.all_ids(facts.out_fs, facts.state)
    except (OSError, faults.TransientFault) as exc:
        raise StorageError(f"storage unreachable or refused: {redact(str(exc))}") from None
    return decide(spec, facts, done)


def read_facts(spec: JobSpec) -> Facts:
    """The read-only facts and checks: input listing and columns, model path, output scan,
    unmarked files and the fingerprint. Writes nothing."""
    in_fs, in_path = filesystem(spec.input.uri, spec.storage)
    out_fs, out_root = filesystem(spec.output.uri, spec.storage)
    check_output_outside_input(spec)
    check_passthrough_names(spec.input)
    listing = faults.retry(
        lambda: inputs.list_input(in_fs, in_path, spec.input), what=f"read {spec.input.uri}"
    )
    folder = inputs.dataset_folder(in_fs, in_path, spec.input.uri)
    check_model_path(spec)
    state = faults.retry(lambda: prefix.scan(out_fs, out_root), what=f"list {out_root}")
    commit.check_unmarked(state)
    check_fingerprint(state, spec)
    return Facts(in_fs, out_fs, out_root, listing, folder, state)


def claim_output(facts: Facts, run_id: str) -> Facts:
    """The writes: probe, lease, then recovery of staged files; the scan is refreshed (reading
    only markers it has not seen) so the decision sees what recovery published."""
    fs, root = facts.out_fs, facts.out_root
    _probe_write(fs, root)
    commit.take_lease(fs, root, run_id)
    state = prefix.scan(fs, root, known=facts.state.markers)
    recovered = commit.recover(fs, root, state)
    return replace(facts, state=state, recovered_files=recovered)


def decide(spec: JobSpec, facts: Facts, done: set[str]) -> Plan:
    """The pending work, a pure function of the facts: files with uncommitted ids, and the
    committed ids to filter out of partly done files."""
    pending, skip, total, skipped = [], [], 0, 0
    for path, ids in facts.listing.ids.items():
        total += len(ids)
        hit = [i for i in ids if i in done]
        skipped += len(hit)
        if len(hit) < len(ids):
            pending.append(path)
            skip += hit
    listing = facts.listing
    return Plan(
        facts.in_fs,
        facts.out_fs,
        facts.out_root,
        len(listing.files) + len(listing.bad_shards),
        pending,
        total,
        skipped,
        skip,
        recovered_files=facts.recovered_files,
        **_input_fields(listing, spec.input, facts.folder),
    )


def _input_fields(listing: inputs.InputListing, spec: InputSpec, folder: str) -> dict:
    """The plan's fields that describe the input (format, columns, image encoding)."""
    schema, question = listing.schema, spec.question_column
    ids = schema.field(spec.id_column).type if spec.id_column in schema.names else pa.string()
    return {
        "integer_ids": pa.types.is_integer(ids),
        "passthrough": inputs.passthrough_schema(schema, spec),
        "has_question": bool(question) and question in schema.names,
        "input_format": listing.format,
        "image_encoding": listing.image_encoding,
        "bad_shards": listing.bad_shards,
        "dataset_folder": folder,
        "items_filtered": listing.filtered_out,
    }


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


def _probe_write(fs: pafs.FileSystem, root: str) -> None:
    """Fail fast when the output prefix is not writable (one tiny object, then deleted)."""
    probe = join(root, commit.RUNS, f".probe-{uuid.uuid4().hex}")
    fs.create_dir(join(root, commit.RUNS), recursive=True)
    with fs.open_output_stream(probe) as f:
        f.write(b"ok")
    fs.delete_file(probe)
