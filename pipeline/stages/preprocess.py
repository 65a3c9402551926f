"""The CPU stage: fetch/decode each image, apply the caps, run the model's processor.

One instance per CPU actor loads the processor once (no weights). Every input row comes
out exactly once: a bad row becomes ``status="error"`` with its cause here and never
reaches the model stage; a row whose image fetch hit a persisting transient fault becomes
``status="deferred"`` (`pipeline.faults`), which the commit sink drops so a rerun retries
it. Images travel as bytes up to this stage; the prepared model inputs travel on as a
pickled `PreparedItem` in the internal ``_prepared`` column.
"""

from __future__ import annotations

import os
import pickle
import time
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline import faults
from pipeline.io.images import decode_image, fetch_bytes, from_pixels
from pipeline.io.inputs import check_columns
from pipeline.io.storage import filesystem, filesystem_path, is_remote, join, redact
from pipeline.io.webdataset import INPUT_ERROR
from pipeline.spec import JobSpec, ProcessorConfig
from resprune.items import ItemError

PREPARED = "_prepared"

PRE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("question", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("error_cause", pa.string()),
        ("image_width", pa.int32()),
        ("image_height", pa.int32()),
        ("question_truncated", pa.bool_()),
        ("preprocess_s", pa.float64()),
        (PREPARED, pa.large_binary()),
    ]
)


def _unexpected(row: dict[str, Any], exc: Exception) -> None:
    """A transient fault or the host running out of memory (the job's sizing, not the
    item) defers the row (never committed; the rerun retries it); anything else is this
    item's fault, named by its exception."""
    message = redact(f"{type(exc).__name__}: {exc}")
    if faults.classify(exc) == faults.TRANSIENT or faults.is_oom(exc):
        row.update(status=faults.DEFERRED, error_cause=faults.TRANSIENT, error=message)
    else:
        row.update(status="error", error_cause="preprocess_error", error=message)


def resolve_path(path: str, root: str | None) -> str:
    """A relative image path resolved against ``root`` (s3:// or local); others unchanged."""
    if root is None or is_remote(path) or path.startswith("file://") or os.path.isabs(path):
        return path
    return join(root, path)


class Preprocess:
    """Map a batch of input rows to prepared rows (same rows, same order)."""

    def __init__(
        self, spec: ProcessorConfig | JobSpec, passthrough: list[str], check_columns: bool = False
    ):
        from resprune.loading import load_preprocessor

        self.spec, self.passthrough, self.unchecked = spec, passthrough, check_columns
        m = spec.model
        self.pre = load_preprocessor(
            m.path,
            family=m.family,
            revision=m.revision,
            trust_remote_code=m.trust_remote_code,
            max_question_tokens=m.max_question_tokens,
            endpoint_url=spec.storage.endpoint_url,
            max_pixels=m.max_pixels,
            min_pixels=m.min_pixels,
        )
        self.fs_cache: dict[bool, Any] = {}

    def __call__(self, batch: pa.Table) -> pa.Table:
        inp = self.spec.input
        if self.unchecked:  # the stage API's dataset had no schema in its plan: check here
            check_columns("the dataset", batch.schema, inp)
            self.unchecked = False
        cols = batch.to_pydict()
        n = batch.num_rows
        questions = cols.get(inp.question_column or "", [None] * n)
        images = cols[inp.image_column or inp.image_uri_column]
        faults_in = cols.get(INPUT_ERROR, [None] * n)
        rows = [
            self._row(*r)
            for r in zip(cols[inp.id_column], questions, images, faults_in, strict=True)
        ]
        out = pa.Table.from_pylist(rows, schema=PRE_SCHEMA)
        source = {inp.output_name(c): c for c in inp.passthrough_columns}
        for name in self.passthrough:  # output names; input.passthrough_rename maps them
            src = source.get(name, name)
            out = out.append_column(batch.schema.field(src).with_name(name), batch.column(src))
        return out

    def _row(self, item_id: str, question: Any, image: Any, fault: str | None) -> dict[str, Any]:
        t0 = time.perf_counter()
        q = question if isinstance(question, str) and question.strip() else None
        row: dict[str, Any] = {
            "id": item_id if isinstance(item_id, str) or item_id is None else str(item_id),
            "question": q or self.spec.model.default_question,
            "status": "ok",
        }
        try:
            if fault:  # the reader found the sample unusable (e.g. a .json member that is not)
                raise ItemError("bad_member", fault)
            img = self._image(image)
            row["image_width"], row["image_height"] = img.size
            item = self.pre.prepare(img, row["question"])
            item.item_id = str(item_id)
            row["question_truncated"] = bool(item.question_truncated)
            row[PREPARED] = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
        except ItemError as exc:
            row.update(status="error", error_cause=exc.cause, error=redact(exc.message))
        except Exception as exc:  # classified by pipeline.faults
            _unexpected(row, exc)
        if row["status"] != "ok":
            row["error"] = f"id={item_id}: {row['error_cause']}: {row['error']}"
        row["preprocess_s"] = time.perf_counter() - t0
        return row

    def _image(self, image: Any) -> Image.Image:
        """Decoded pixels as they come (Ray Data ``read_images``, PIL or numpy rows), else
        the encoded bytes decoded within the caps."""
        if isinstance(image, np.ndarray | Image.Image):
            caps = self._caps()
            return from_pixels(image, max_pixels=caps["max_pixels"], max_aspect=caps["max_aspect"])
        return decode_image(self._bytes(image), **self._caps())

    def _bytes(self, image: Any) -> bytes | None:
        """Encoded bytes of a row's image: the bytes themselves, the datasets ``Image()``
        struct's bytes (else its path), or the file a path column names."""
        if isinstance(image, dict):
            if image.get("bytes"):
                return image["bytes"]
            image = image.get("path")
        elif not self.spec.input.image_uri_column:
            return image
        if not image:
            return None
        uri = resolve_path(image, self.spec.input.image_root)
        remote = is_remote(uri)
        if remote not in self.fs_cache:
            self.fs_cache[remote] = filesystem(uri, self.spec.storage)[0]
        return fetch_bytes(
            self.fs_cache[remote],
            filesystem_path(uri),
            max_bytes=self.spec.execution.max_image_bytes,
        )

    def _caps(self) -> dict[str, Any]:
        ex = self.spec.execution
        return {
            "max_bytes": ex.max_image_bytes,
            "max_pixels": ex.max_image_pixels,
            "max_aspect": ex.max_aspect_ratio,
        }
