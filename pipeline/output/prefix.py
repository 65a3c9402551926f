"""What an output prefix holds, read in one listing: markers, staged and visible files, ids.

Read-only: `scan` lists the prefix once (one recursive listing) and reads each marker once;
`read_ids` reads the id column of each committed file. Both work on any layout: every file
is read on its own (``pq.ParquetFile``), never as a dataset, so no hive partition is inferred
from ``key=value`` segments such as ``run_date=2026-11-24/`` in the prefix. Decisions that
write (recovery, de-duplication, the lease) live in `pipeline.output.commit`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import faults
from pipeline.io.storage import join, read_json

MANIFEST, STAGING, RUNS = "_manifest", "_staging", "_runs"
MARKER_SUFFIX = ".parquet.json"


@dataclass
class PrefixState:
    """One listing of an output prefix: committed markers, staged and visible result files."""

    root: str
    markers: dict[str, dict[str, Any]] = field(default_factory=dict)  # file name -> marker
    staged: set[str] = field(default_factory=set)  # names under _staging/
    visible: set[str] = field(default_factory=set)  # result names at the root
    unmarked: list[str] = field(default_factory=list)  # visible Parquet without a marker
    ids: dict[str, list[str]] | None = None  # committed file name -> ids, once read

    def committed_path(self, name: str) -> str | None:
        """Where a committed file's rows are now: the result, else its staging copy."""
        if name in self.visible:
            return join(self.root, name)
        if name in self.staged:
            return join(self.root, STAGING, name)
        return None


def scan(
    fs: pafs.FileSystem, root: str, known: dict[str, dict[str, Any]] | None = None
) -> PrefixState:
    """List ``root`` once; markers already read (``known``) are not read again (immutable)."""
    state = PrefixState(root)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return state
    known = known or {}
    results: list[str] = []
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(root) :].strip("/")
        folder, _, name = rel.rpartition("/")
        if folder == MANIFEST and name.endswith(MARKER_SUFFIX):
            file = name[: -len(".json")]
            state.markers[file] = known.get(file) or read_json(fs, info.path)
        elif folder == STAGING:
            state.staged.add(name)
        elif rel.endswith(".parquet") and not _hidden(rel):
            results.append(rel)
    state.visible = {r for r in results if "/" not in r}
    state.unmarked = sorted(join(root, r) for r in results if r not in state.markers)
    return state


def _hidden(rel: str) -> bool:
    return any(part.startswith(("_", ".")) for part in rel.split("/"))


def read_ids(fs: pafs.FileSystem, state: PrefixState) -> dict[str, list[str]]:
    """Ids of each committed file whose rows still exist (file name -> ids; read once)."""
    if state.ids is None:
        paths = {name: state.committed_path(name) for name in sorted(state.markers)}
        state.ids = {name: file_ids(fs, p) for name, p in paths.items() if p is not None}
    return state.ids


def all_ids(fs: pafs.FileSystem, state: PrefixState) -> set[str]:
    """Every committed id."""
    return {i for ids in read_ids(fs, state).values() for i in ids}


def file_ids(fs: pafs.FileSystem, path: str) -> list[str]:
    """The id column of one result file (read alone: no partition inference)."""

    def read() -> list[str]:
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).read(columns=["id"]).column(0).to_pylist()

    return faults.retry(read, what=f"read {path}")


def duplicates(
    ids: dict[str, list[str]], markers: dict[str, dict[str, Any]]
) -> dict[str, set[str]]:
    """Ids each file must give up so every id is committed once (file name -> lost ids).

    Deterministic: an id held by several files stays in the most recently committed one
    (ties: the greater name), so a run's own files win over a late write of an old run.
    """
    order = sorted(ids, key=lambda n: (markers[n].get("committed_at", 0.0), n), reverse=True)
    owner: dict[str, str] = {}
    lost: dict[str, set[str]] = {}
    for name in order:
        for item in ids[name]:
            if item in owner:
                lost.setdefault(name, set()).add(item)
            else:
                owner[item] = name
    return lost
