"""Folders written by Hugging Face `datasets`' ``Dataset.save_to_disk``: find and read them.

Such a folder holds ``state.json`` (which lists the data files, in order), ``dataset_info.json``
and Arrow IPC *stream* files (``data-00000-of-00001.arrow``); a ``DatasetDict`` holds one such
folder per split (one is read: ``input.split`` names it when there are several). We take
the file list from ``state.json`` (a folder re-used by
``load_from_disk(...).map`` also holds ``cache-*.arrow`` files that are not the dataset), and
let pyarrow parse the files (here for the plan's ids; `pipeline.io.readers` for the job).
Non-goals: the ``_indices`` mapping of an unflattened dataset (``save_to_disk`` flattens it),
and datasets' own feature decoding (images stay encoded until the CPU stage).
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.io.storage import StorageError, join, read_json

STATE = "state.json"


def is_state_file(path: str) -> bool:
    """True for a save_to_disk folder's ``state.json``."""
    return path.rsplit("/", 1)[-1] == STATE


def one_split(states: list[str], root: str, split: str | None, uri: str) -> list[str]:
    """The ``state.json`` of the split to read: a DatasetDict's splits are never merged.

    Several splits need ``split`` (their folder names under ``root``); one is read as is.
    """
    names = {_split_name(state, root): state for state in states}
    if split is None:
        if len(states) > 1:
            raise StorageError(
                f"{uri} is a DatasetDict with splits {sorted(names)}: set input.split to one "
                "of them, or point input.uri at one split's folder"
            )
        return states
    chosen = [state for name, state in names.items() if split in (name, name.rsplit("/", 1)[-1])]
    if len(chosen) != 1:
        raise StorageError(f"input.split {split!r}: {uri} holds split(s) {sorted(names)}")
    return chosen


def _split_name(state: str, root: str) -> str:
    folder = state.rsplit("/", 1)[0]
    name = folder[len(root) :].strip("/") if folder.startswith(root) else folder
    return name or "(the folder itself)"


def data_files(fs: pafs.FileSystem, states: list[str]) -> list[str]:
    """The Arrow files each ``state.json`` lists, in the dataset's order."""
    files: list[str] = []
    for state in states:
        folder = state.rsplit("/", 1)[0]
        listed = read_json(fs, state).get("_data_files") or []
        if not listed:
            raise StorageError(f"{state}: lists no _data_files (not a save_to_disk folder?)")
        files += [join(folder, entry["filename"]) for entry in listed]
    return files


def open_stream(fs: pafs.FileSystem, path: str) -> pa.ipc.RecordBatchStreamReader:
    """An Arrow IPC stream reader (memory-mapped when the file is local)."""
    if isinstance(fs, pafs.LocalFileSystem):
        return pa.ipc.open_stream(pa.memory_map(path))
    return pa.ipc.open_stream(fs.open_input_stream(path))


def read_schema(fs: pafs.FileSystem, path: str) -> pa.Schema:
    """The file's schema (the stream's first message; no rows are read)."""
    try:
        return open_stream(fs, path).schema
    except pa.ArrowInvalid as exc:
        raise StorageError(f"cannot read input {path}: not an Arrow stream file: {exc}") from None


def read_schema_and_columns(
    fs: pafs.FileSystem, path: str, columns: list[str], check: Callable[[str, pa.Schema], None]
) -> tuple[pa.Schema, pa.Table]:
    """The file's schema (checked by ``check`` before any row is read) and ``columns``
    (its ids, and what input.filter reads)."""
    try:
        reader = open_stream(fs, path)
        check(path, reader.schema)
        batches = [batch.select(columns) for batch in reader]
    except pa.ArrowInvalid as exc:
        raise StorageError(f"cannot read input {path}: not an Arrow stream file: {exc}") from None
    wanted = pa.schema([reader.schema.field(c) for c in columns])
    return reader.schema, pa.Table.from_batches(batches, schema=wanted)
