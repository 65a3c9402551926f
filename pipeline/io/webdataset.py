"""WebDataset tar shards (as img2dataset writes them): list a shard's samples, shape its rows.

A sample is the run of tar members sharing a key (the member name up to the basename's first
dot): ``000123.jpg`` + ``000123.txt`` + ``000123.json``. The row's id is the key, its image the
image member, its question (and pass-through columns) a field of the ``.json`` or a text member
such as ``txt``. Ray Data's ``read_webdataset`` reads the shards in the job (members kept as
bytes); here the driver lists each shard's keys once, for resume and counts, and turns a shard
Ray's reader would fail on (cut short, a broken header, keys not contiguous) into one
`ShardError` instead of a crashed job. Non-goals: compressed or remote-URL shards.
"""

from __future__ import annotations

import json
import re
import tarfile
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.spec import ColumnsSpec

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
INPUT_ERROR = "_input_error"  # a row whose sample is unusable; the CPU stage makes it an error row
# Ray's own rule (webdataset_datasource._base_plus_ext): key = name up to the basename's first dot.
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_CHUNK = 1 << 20
_BUFFER = 8 << 20  # tarfile reads 10 KiB at a time: unbuffered, that is one S3 GET each


class ShardError(ValueError):
    """A shard that cannot be read whole; the message names the shard and the cause."""


def sample_keys(fs: pafs.FileSystem, path: str) -> list[str]:
    """The shard's sample keys in order, grouped as Ray's reader groups them.

    Streams the whole shard (member data included, so a shard cut short is noticed);
    raises ShardError for an unreadable shard and lets OSError (storage) through.
    """
    keys: list[str] = []
    seen: set[str] = set()
    members: set[str] = set()
    try:
        with (
            fs.open_input_stream(path, buffer_size=_BUFFER) as raw,
            tarfile.open(fileobj=raw, mode="r|*") as tar,
        ):
            for member in tar:
                match = _KEY.match(member.name) if member.isreg() else None
                if match is None:
                    continue
                key, suffix = match.groups()
                if not keys or keys[-1] != key:
                    if key in seen:
                        raise ShardError(f"{path}: members of sample {key!r} are not contiguous")
                    keys.append(key)
                    seen.add(key)
                    members = set()
                if suffix in members:
                    raise ShardError(f"{path}: sample {key!r} has two {suffix!r} members")
                members.add(suffix)
                _drain(tar.extractfile(member))
            _check_tail(tar, path)
    except tarfile.TarError as exc:
        raise ShardError(f"{path}: not a readable tar shard: {exc}") from None
    return keys


def _drain(member: Any) -> None:
    while member.read(_CHUNK):
        pass


def _check_tail(tar: tarfile.TarFile, path: str) -> None:
    """After the last member come the end-of-archive zero blocks and nothing else: without
    them the shard was cut short; with data there a header was unreadable (tarfile, and so
    Ray's reader, would silently drop every later sample)."""
    tail = 0
    while block := tar.fileobj.read(_CHUNK):
        tail += len(block)
        if block.strip(b"\0"):
            raise ShardError(f"{path}: unreadable tar header after byte {tar.offset}")
    if tail == 0:
        raise ShardError(f"{path}: no end-of-archive marker after byte {tar.offset}: cut short?")


def row_schema(spec: ColumnsSpec) -> pa.Schema:
    """The columns a shard's samples become (pass-through values are strings)."""
    names = [spec.question_column] if spec.question_column else []
    names += [n for n in spec.passthrough_columns if n not in names]
    return pa.schema(
        [(spec.id_column, pa.string()), (image_name(spec), pa.binary())]
        + [(n, pa.string()) for n in names]
        + [(INPUT_ERROR, pa.string())]
    )


def image_encoding(spec: ColumnsSpec) -> str:
    """Which member holds the image (for `validate --deep`)."""
    return f"encoded bytes in member .{'|.'.join(_image_members(spec.image_column))}"


def _image_members(column: str | None) -> tuple[str, ...]:
    return (column,) if column and column != "image" else IMAGE_MEMBERS


def image_name(spec: ColumnsSpec) -> str:
    """The image column of the rows (the spec's image_column)."""
    return spec.image_column or "image"


def to_rows(batch: pa.Table, *, spec: ColumnsSpec) -> pa.Table:
    """Ray's samples (``__key__`` plus one column per member, as bytes) -> the job's rows."""
    schema = row_schema(spec)
    rows = [_row(sample, spec, schema.names[2:-1]) for sample in batch.to_pylist()]
    return pa.Table.from_pylist(rows, schema=schema)


def _row(sample: dict[str, Any], spec: ColumnsSpec, text_names: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = {spec.id_column: sample["__key__"]}
    row[image_name(spec)] = _image(sample, spec.image_column)
    try:
        meta = _json(sample)
        for name in text_names:
            row[name] = _text(sample, meta, name)
    except ValueError as exc:
        row[INPUT_ERROR] = f"{exc}"
    return row


def _image(sample: dict[str, Any], column: str | None) -> bytes | None:
    for suffix in _image_members(column):
        if isinstance(sample.get(suffix), bytes):
            return sample[suffix]
    return None


def _json(sample: dict[str, Any]) -> dict[str, Any]:
    raw = sample.get("json")
    if not isinstance(raw, bytes):
        return {}
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"member {sample['__key__']}.json is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"member {sample['__key__']}.json is not a JSON object")
    return meta


def _text(sample: dict[str, Any], meta: dict[str, Any], name: str) -> str | None:
    """A .json field (non-strings as JSON text), else a text member such as ``txt``."""
    if name in meta:
        value = meta[name]
        return value if isinstance(value, str) or value is None else json.dumps(value)
    raw = sample.get(name)
    if not isinstance(raw, bytes):
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"member {sample['__key__']}.{name} is not UTF-8 text: {exc}") from None
