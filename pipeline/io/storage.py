"""Filesystems for job URIs: local folders and S3(-compatible) prefixes through pyarrow.

Scope: turn a URI into ``(pyarrow.fs.FileSystem, path)``, list Parquet inputs, small JSON
reads/writes, and scrub credentials out of any text we print or store.

Credentials are never passed to pyarrow explicitly: the S3 filesystem resolves them from the
environment or the node's identity, so a pickled filesystem (shipped to Ray workers) carries
only the endpoint and region. Transient S3 faults are retried by the AWS SDK's default
strategy with a bound (`S3_ATTEMPTS`) and bounded timeouts; the strategy does not survive
pickling, so workers build their filesystem from the URI. Non-goal: caching.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from pipeline import faults
from pipeline.spec import StorageSpec

_USERINFO = re.compile(r"(\w+://)[^/@\s]+@")
S3_ATTEMPTS = 6  # AWS SDK retries (5xx, throttling, resets) with 25 ms * 2^n backoff
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")


class StorageError(RuntimeError):
    """A whole-job storage problem (unreachable endpoint, missing input, no write access)."""


def is_remote(uri: str) -> bool:
    """True for ``s3://`` URIs."""
    return uri.startswith(("s3://", "s3a://"))


def filesystem(uri: str, storage: StorageSpec | None = None) -> tuple[pafs.FileSystem, str]:
    """Resolve a URI to a filesystem and a path inside it (no credentials in the object)."""
    if "@" in urlsplit(uri).netloc:
        raise StorageError(f"{redact(uri)}: credentials in URIs are refused; use the environment")
    if is_remote(uri):
        storage = storage or StorageSpec()
        endpoint = storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        region = (
            storage.region
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
        )
        fs = pafs.S3FileSystem(
            endpoint_override=endpoint,
            region=region,
            connect_timeout=10,
            request_timeout=60,
            retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=S3_ATTEMPTS),
        )
        return fs, filesystem_path(uri)
    return pafs.LocalFileSystem(), filesystem_path(uri)


def filesystem_path(uri: str) -> str:
    """The path part of a URI as `filesystem` returns it."""
    if is_remote(uri):
        return uri.split("://", 1)[1].rstrip("/")
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return os.path.abspath(path).rstrip("/")


def join(*parts: str) -> str:
    """Join path parts with ``/`` (works for local and S3 paths)."""
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts) if p)


def list_files(fs: pafs.FileSystem, path: str, suffix: str = "") -> list[str]:
    """Sorted files under a folder (recursive), or one file, or a glob's matches."""
    if any(c in path for c in "*?["):
        import fnmatch

        base = path[: min(path.find(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
        return sorted(p for p in list_files(fs, base, suffix) if fnmatch.fnmatch(p, path))
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [path]
    if info.type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted(
        i.path
        for i in infos
        if i.type == pafs.FileType.File
        and i.path.endswith(suffix)
        and not any(seg.startswith(("_", ".")) for seg in i.path[len(path) :].split("/"))
    )


def read_json(fs: pafs.FileSystem, path: str) -> Any:
    """Read a small JSON object (transient faults retried)."""

    def read() -> Any:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())

    return faults.retry(read, what=f"read {path}")


def write_json(fs: pafs.FileSystem, path: str, obj: Any) -> None:
    """Write a small JSON object in one request (an S3 PUT is all-or-nothing)."""
    data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    """True when a file exists."""
    return fs.get_file_info(path).type == pafs.FileType.File


def redact(text: str) -> str:
    """Remove credentials (URI userinfo and AWS secret env values) from a message."""
    text = _USERINFO.sub(r"\1***@", str(text))
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text
