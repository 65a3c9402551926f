"""Exactly-once output: content-named Parquet files committed by a marker, rolled forward.

Why not Ray Data's `CheckpointConfig`: its resume adds a CheckpointFilter actor pool that
stalled a 2-CPU cluster (RELIABILITY.md §1.8), it keeps every id in memory, and orphans stay
visible in the output prefix until the next run. This module is small and has no such
coupling. Each file goes through three steps, every one idempotent:

1. write ``_staging/<name>`` (invisible: readers skip ``_``-prefixed paths);
2. write the marker ``_manifest/<name>.json`` (one S3 PUT: the **commit point**; it holds
   the file's summable stats);
3. move the staging file to ``<name>`` (a rename locally; copy + delete on S3).

``<name>`` is ``part-<sha1 of the sorted ids>.parquet``, so a retried write of the same rows
lands on the same name. `recover` runs before planning: it rolls committed files forward
(step 3) and deletes staging files that have no marker (a write killed before its commit).
So a visible result file is always complete and committed, a committed id is never
processed again, and an uncommitted one is simply redone.

Writers from a killed run can outlive its driver for a while (orphaned Ray workers). Each run
takes the prefix's lease (``_manifest/_lease.json``) after its read-only checks, and a writer
checks it holds the lease just before its commit point; a superseded writer drops its staged
file. The check and the marker are two requests, so a writer that passed the check can still
commit after a new run planned. Conditional writes do not close this: SeaweedFS 4.48 and AWS
honour ``If-None-Match``/``If-Match`` on PutObject (checked against the test server), but a
condition guards only the key being written, never the lease, and pyarrow exposes none. That
race is
closed by id-level de-duplication (`dedupe`): an id held by several committed files stays in
the most recently committed one and the others are rewritten without it, at the end of each
run and in every recovery. A marker whose file vanished is dropped by `recover`, and its rows
are redone. Killed multipart uploads leave no object; an S3 lifecycle rule
(AbortIncompleteMultipartUpload) reclaims their parts.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data import Datasink

from pipeline import faults
from pipeline.io.storage import StorageError, exists, filesystem, join, read_json, write_json
from pipeline.output import prefix
from pipeline.output.prefix import MANIFEST, RUNS, STAGING, PrefixState
from pipeline.spec import StorageSpec

__all__ = ["MANIFEST", "RUNS", "STAGING", "CommitSink", "SupersededError", "commit_table"]
LEASE = "_lease.json"


class SupersededError(RuntimeError):
    """A newer run took this output prefix; this run's writes are dropped."""


def take_lease(fs: pafs.FileSystem, root: str, run_id: str) -> None:
    """Make ``run_id`` the only run allowed to commit under ``root``."""
    write_json(fs, join(root, MANIFEST, LEASE), {"run_id": run_id, "taken_at": time.time()})


def release_lease(fs: pafs.FileSystem, root: str, run_id: str) -> bool:
    """Give the prefix's lease up at the end of ``run_id`` (if it still holds it): the lease
    then names no run, so late writes of this run's orphaned workers are still dropped, and
    the next run takes it as usual. True when released."""
    path = join(root, MANIFEST, LEASE)
    if not exists(fs, path) or read_json(fs, path).get("run_id") != run_id:
        return False
    write_json(fs, path, {"run_id": None, "released_by": run_id, "released_at": time.time()})
    return True


def _check_lease(fs: pafs.FileSystem, root: str, run_id: str) -> None:
    path = join(root, MANIFEST, LEASE)
    holder = read_json(fs, path).get("run_id") if exists(fs, path) else run_id
    if holder != run_id:
        raise SupersededError(f"run {run_id} was superseded on {root} by run {holder}")


def file_name(ids: list[str]) -> str:
    """Deterministic result file name for a set of ids."""
    digest = hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:24]
    return f"part-{digest}.parquet"


def table_stats(table: pa.Table) -> dict[str, Any]:
    """Summable per-file statistics (the marker's payload)."""
    rows = table.to_pydict()
    causes = Counter(c for c in rows["error_cause"] if c)
    paired = [a is not None for a in rows["shadow_answer"]]
    errors = rows.get("shadow_error", [None] * table.num_rows)  # files of older versions lack it
    failed = {b for b, e in zip(rows["batch_id"], errors, strict=True) if e}
    return {
        "rows": table.num_rows,
        "items_ok": sum(s == "ok" for s in rows["status"]),
        "items_error": sum(s == "error" for s in rows["status"]),
        "errors_by_cause": dict(causes),
        "gpu_seconds": sum(s or 0.0 for s in rows["gpu_seconds"]),
        "shadow_items": sum(paired),
        "shadow_gpu_seconds": sum(s or 0.0 for s in rows["shadow_gpu_seconds"]),
        "shadow_failed_batches": len(failed),
        "new_tokens": sum(n or 0 for n in rows["new_tokens"]),
        "relevance_extractors": dict(Counter(e for e in rows["relevance_extractor"] if e)),
    }


def commit_table(
    fs: pafs.FileSystem,
    root: str,
    table: pa.Table,
    run_id: str,
    fingerprint: str = "",
    spec_fields: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write one result file through staging -> lease check -> marker -> final."""
    meta = {"run_id": run_id, "spec_fingerprint": fingerprint, "spec_fields": spec_fields or {}}
    return _publish(fs, root, table, meta, lambda: _check_lease(fs, root, run_id))


def _publish(
    fs: pafs.FileSystem, root: str, table: pa.Table, meta: dict[str, Any], check: Any = None
) -> dict[str, Any]:
    name = file_name(table.column("id").to_pylist())
    staging = join(root, STAGING, name)
    fs.create_dir(join(root, STAGING), recursive=True)
    pq.write_table(table, staging, filesystem=fs)
    try:
        if check is not None:
            check()
    except SupersededError:
        fs.delete_file(staging)
        raise
    stats = {"file": name, **meta, "committed_at": time.time(), **table_stats(table)}
    write_json(fs, join(root, MANIFEST, name + ".json"), stats)
    fs.move(staging, join(root, name))
    return stats


class CommitSink(Datasink[list[dict[str, Any]]]):
    """Ray Data sink: each write task commits its rows in files of at most `rows_per_file`.

    Rows a transient fault left unanswered (status ``deferred``) are not committed: a rerun
    does them again. The filesystem is built in the worker (its retry policy does not pickle),
    and a commit that still hits a transient fault is retried whole (names are deterministic).
    """

    def __init__(
        self,
        uri: str,
        storage: StorageSpec,
        *,
        run_id: str,
        fingerprint: str,
        spec_fields: dict[str, Any],
        rows_per_file: int,
        min_rows_per_file: int,
    ):
        self.uri, self.storage, self.run_id = uri, storage, run_id
        self.fingerprint, self.spec_fields = fingerprint, spec_fields
        self.rows_per_file, self._min_rows = rows_per_file, min_rows_per_file

    @property
    def min_rows_per_write(self) -> int | None:
        return self._min_rows

    def write(self, blocks: Iterable[pa.Table], ctx: Any) -> list[dict[str, Any]]:
        tables = [b for b in blocks if b.num_rows]
        if not tables:
            return []
        table = pa.concat_tables(tables, promote_options="default")
        table = table.filter(pc.not_equal(table.column("status"), faults.DEFERRED))
        fs, root = filesystem(self.uri, self.storage)
        step = self.rows_per_file
        slices = [table.slice(i, step) for i in range(0, table.num_rows, step)]
        return [self._commit(fs, root, part) for part in slices]

    def _commit(self, fs: pafs.FileSystem, root: str, table: pa.Table) -> dict[str, Any]:
        meta = (self.run_id, self.fingerprint, self.spec_fields)
        return faults.retry(lambda: commit_table(fs, root, table, *meta), what=f"commit to {root}")


def check_unmarked(state: PrefixState) -> None:
    """Refuse a prefix holding Parquet results that no marker commits (read-only)."""
    if state.unmarked:
        raise StorageError(
            f"{state.root} holds {len(state.unmarked)} Parquet file(s) without commit markers "
            f"(e.g. {state.unmarked[0]}); refusing to mix runs: use an empty output prefix"
        )


def recover(fs: pafs.FileSystem, root: str, state: PrefixState | None = None) -> int:
    """Roll committed files forward, drop uncommitted staging files and markers whose file
    vanished, then de-duplicate ids; returns the files fixed. Updates ``state`` in place."""
    state = state or prefix.scan(fs, root)
    check_unmarked(state)
    fixed = 0
    for name in sorted(state.staged):
        if name in state.markers and name not in state.visible:
            fs.move(join(root, STAGING, name), join(root, name))
            state.visible.add(name)
        else:
            fs.delete_file(join(root, STAGING, name))
        fixed += 1
    state.staged.clear()
    for name in sorted(state.markers.keys() - state.visible):
        fs.delete_file(join(root, MANIFEST, name + ".json"))
        del state.markers[name]
        (state.ids or {}).pop(name, None)
        fixed += 1
    return fixed + dedupe(fs, root, state)


def dedupe(fs: pafs.FileSystem, root: str, state: PrefixState | None = None) -> int:
    """Rewrite files so each id is committed once (see `prefix.duplicates`); returns files."""
    state = state or prefix.scan(fs, root)
    ids = prefix.read_ids(fs, state)
    lost = prefix.duplicates(ids, state.markers)
    for name, drop in sorted(lost.items()):
        old = state.markers.pop(name)
        kept = [i for i in ids.pop(name) if i not in drop]
        if kept:
            table = pq.read_table(join(root, name), filesystem=fs, partitioning=None)
            table = table.filter(pc.is_in(table.column("id"), value_set=pa.array(kept)))
            meta = {k: old.get(k) for k in ("run_id", "spec_fingerprint", "spec_fields")}
            stats = _publish(fs, root, table, meta)
            state.markers[stats["file"]], ids[stats["file"]] = stats, kept
            state.visible.add(stats["file"])
        fs.delete_file(join(root, name))  # file first: a crash here leaves a marker whose
        fs.delete_file(join(root, MANIFEST, name + ".json"))  # file vanished (recoverable)
        state.visible.discard(name)
    return len(lost)


def committed_ids(fs: pafs.FileSystem, root: str) -> set[str]:
    """Ids in committed output (read-only; works before recovery too)."""
    return prefix.all_ids(fs, prefix.scan(fs, root))


def committed_files(fs: pafs.FileSystem, root: str) -> list[str]:
    """Paths of committed result files (after `recover`)."""
    return [join(root, name) for name in sorted(prefix.scan(fs, root).markers)]


def manifest_stats(fs: pafs.FileSystem, root: str) -> list[dict[str, Any]]:
    """All markers' stats (for totals over every run into this prefix)."""
    return list(prefix.scan(fs, root).markers.values())
