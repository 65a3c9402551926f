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
takes the prefix's lease (``_manifest/_lease.json``) before recovery, and a writer checks it
holds the lease just before its commit point; a superseded writer drops its staged file. So
a rerun started right after a crash is not raced by the old run's last writes (the window
left is one read and one PUT), and of two runs on one prefix the older stops at its next
commit. A marker whose file vanished (its staging file was cleaned under it) is dropped by
`recover`, and its rows are redone. Killed multipart uploads leave
no object; an S3 lifecycle rule (AbortIncompleteMultipartUpload) reclaims their parts.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data import Datasink

from pipeline.storage import StorageError, exists, join, list_files, read_json, write_json

MANIFEST, STAGING, RUNS = "_manifest", "_staging", "_runs"
LEASE = "_lease.json"


class SupersededError(RuntimeError):
    """A newer run took this output prefix; this run's writes are dropped."""


def take_lease(fs: pafs.FileSystem, root: str, run_id: str) -> None:
    """Make ``run_id`` the only run allowed to commit under ``root``."""
    write_json(fs, join(root, MANIFEST, LEASE), {"run_id": run_id, "taken_at": time.time()})


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
    shadow_s = [s for s in rows["shadow_gpu_seconds"] if s is not None]
    return {
        "rows": table.num_rows,
        "items_ok": sum(s == "ok" for s in rows["status"]),
        "items_error": sum(s == "error" for s in rows["status"]),
        "errors_by_cause": dict(causes),
        "gpu_seconds": sum(s or 0.0 for s in rows["gpu_seconds"]),
        "shadow_items": len(shadow_s),
        "shadow_gpu_seconds": sum(shadow_s),
        "new_tokens": sum(n or 0 for n in rows["new_tokens"]),
        "relevance_extractors": dict(Counter(e for e in rows["relevance_extractor"] if e)),
    }


def commit_table(
    fs: pafs.FileSystem, root: str, table: pa.Table, run_id: str, fingerprint: str = ""
) -> dict[str, Any]:
    """Write one result file through staging -> marker -> final; returns its stats."""
    name = file_name(table.column("id").to_pylist())
    staging = join(root, STAGING, name)
    fs.create_dir(join(root, STAGING), recursive=True)
    pq.write_table(table, staging, filesystem=fs)
    try:
        _check_lease(fs, root, run_id)
    except SupersededError:
        fs.delete_file(staging)
        raise
    stats = {"file": name, "run_id": run_id, "spec_fingerprint": fingerprint,
             "committed_at": time.time(), **table_stats(table)}  # fmt: skip
    write_json(fs, join(root, MANIFEST, name + ".json"), stats)
    fs.move(staging, join(root, name))
    return stats


class CommitSink(Datasink[list[dict[str, Any]]]):
    """Ray Data sink: each write task commits its rows in files of at most `rows_per_file`."""

    def __init__(self, fs: pafs.FileSystem, root: str, *, run_id: str, fingerprint: str,
                 rows_per_file: int, min_rows_per_file: int):  # fmt: skip
        self.fs, self.root, self.run_id, self.fingerprint = fs, root, run_id, fingerprint
        self.rows_per_file, self._min_rows = rows_per_file, min_rows_per_file

    @property
    def min_rows_per_write(self) -> int | None:
        return self._min_rows

    def write(self, blocks: Iterable[pa.Table], ctx: Any) -> list[dict[str, Any]]:
        tables = [b for b in blocks if b.num_rows]
        if not tables:
            return []
        table = pa.concat_tables(tables, promote_options="default")
        step = self.rows_per_file
        return [
            commit_table(self.fs, self.root, table.slice(i, step), self.run_id, self.fingerprint)
            for i in range(0, table.num_rows, step)
        ]


def recover(fs: pafs.FileSystem, root: str) -> int:
    """Roll committed files forward and drop uncommitted staging files; returns files fixed."""
    markers = {p.rsplit("/", 1)[1][: -len(".json")] for p in _markers(fs, root)}
    staged = {p.rsplit("/", 1)[1]: p for p in _list(fs, join(root, STAGING))}
    fixed = 0
    for name, staging in staged.items():
        if name in markers and not exists(fs, join(root, name)):
            fs.move(staging, join(root, name))
        else:
            fs.delete_file(staging)
        fixed += 1
    for name in markers - staged.keys():
        if not exists(fs, join(root, name)):  # committed, then its staging file was cleaned
            fs.delete_file(join(root, MANIFEST, name + ".json"))
            fixed += 1
    unmarked = [p for p in list_files(fs, root, ".parquet") if p.rsplit("/", 1)[1] not in markers]
    if unmarked:
        raise StorageError(
            f"{root} holds {len(unmarked)} Parquet file(s) without commit markers "
            f"(e.g. {unmarked[0]}); refusing to mix runs: use an empty output prefix"
        )
    return fixed


def committed_files(fs: pafs.FileSystem, root: str) -> list[str]:
    """Paths of committed result files (after `recover`)."""
    return [join(root, p.rsplit("/", 1)[1][: -len(".json")]) for p in _markers(fs, root)]


def committed_ids(fs: pafs.FileSystem, root: str) -> set[str]:
    """Ids already in committed output."""
    files = committed_files(fs, root)
    if not files:
        return set()
    return set(pq.ParquetDataset(files, filesystem=fs).read(columns=["id"]).column(0).to_pylist())


def manifest_stats(fs: pafs.FileSystem, root: str) -> list[dict[str, Any]]:
    """All markers' stats (for totals over every run into this prefix)."""
    return [read_json(fs, p) for p in _markers(fs, root)]


def _markers(fs: pafs.FileSystem, root: str) -> list[str]:
    return [p for p in _list(fs, join(root, MANIFEST)) if p.endswith(".parquet.json")]


def _list(fs: pafs.FileSystem, path: str) -> list[str]:
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File)
