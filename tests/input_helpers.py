"""Input data built with the libraries users build it with: `datasets` exports and tar shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import datasets
import pytest

ASSETS = Path(__file__).resolve().parent.parent / "pipeline" / "assets" / "images"
FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "image": datasets.Image(),
        "question": datasets.Value("string"),
        "answers": datasets.List(datasets.Value("string")),
        "meta": {"source": datasets.Value("string"), "votes": datasets.Value("int32")},
    }
)


def vqa_dataset(folder: Path, monkeypatch: pytest.MonkeyPatch) -> datasets.Dataset:
    """A VQA set as `datasets` holds it: embedded bytes, a relative and an absolute path.

    The relative path is relative to ``folder`` (the dataset's folder); ``images/`` holds it.
    """
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "images" / "coffee.jpg").write_bytes((ASSETS / "coffee.jpg").read_bytes())
    monkeypatch.chdir(folder)  # datasets checks relative paths against the working directory
    images = [
        {"bytes": (ASSETS / "chelsea.jpg").read_bytes(), "path": "chelsea.jpg"},
        {"bytes": None, "path": "images/coffee.jpg"},
        {"bytes": None, "path": str(ASSETS / "rocket.jpg")},
        {"bytes": b"not an image", "path": "broken.jpg"},
    ]
    return datasets.Dataset.from_dict(
        {
            "id": ["cat", "coffee", "rocket", "broken"],
            "image": images,
            "question": ["What animal is this?", None, "What is this?", "What?"],
            "answers": [["cat", "a cat"], ["coffee"], [], ["?"]],
            "meta": [{"source": f"s{i}", "votes": i} for i in range(4)],
        },
        features=FEATURES,
    )


def export_hub_layout(ds: datasets.Dataset, folder: Path) -> Path:
    """``Dataset.to_parquet`` in the hub's ``data/train-00000-of-00001.parquet`` layout."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    return folder


def sample(key: str, image: bytes, meta: dict | bytes, caption: str) -> list[tuple[str, bytes]]:
    """One sample's members in img2dataset's layout: {key}.jpg, {key}.txt, {key}.json."""
    raw = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    return [(f"{key}.jpg", image), (f"{key}.txt", caption.encode()), (f"{key}.json", raw)]


def write_shard(path: Path, samples: list[list[tuple[str, bytes]]]) -> bytes:
    """A tar shard written with `tarfile`; returns its bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for members in samples:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), 1_700_000_000
                tar.addfile(info, io.BytesIO(data))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()
