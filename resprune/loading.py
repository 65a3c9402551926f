"""Load a supported VLM, or only its preprocessor (no weights), from a folder, S3 or the hub.

``path`` is a local folder, an ``s3://bucket/prefix`` (downloaded once into a local cache keyed
by the URI and checked against the object listing's sizes and ETags before reuse), or a hub
id (``revision`` is passed through; pin a commit). The family comes from the checkpoint's
``model_type``. Weights load from safetensors only and ``trust_remote_code`` stays off unless
the caller turns it on (RELIABILITY.md §4.1). Every failure to find or recognise a model is
one exception with a one-line message. Non-goals: quantisation, device maps, sharded
multi-GPU loading.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from resprune.models import ADAPTERS, FAMILIES, VLM
from resprune.models.internvl import ImageOnlyInternVLProcessor
from resprune.models.qwen_processor import DEFAULT_MAX_PIXELS, IMAGE_ONLY, limit_pixels
from resprune.prompts import Preprocessor

ATTENTION = ("sdpa", "flash_attention_2", "eager")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MANIFEST = ".resprune-manifest.json"
# families whose processor is built image-only when AutoProcessor needs torchvision (for its
# video processor); the Qwen ones also take model.max_pixels / min_pixels
QWEN_FAMILIES = {
    "qwen2_5_vl": IMAGE_ONLY["qwen2_5_vl"],
    "qwen3_vl": IMAGE_ONLY["qwen3_vl"],
    "qwen3_vl_moe": IMAGE_ONLY["qwen3_vl"],
}
IMAGE_ONLY_FAMILIES = QWEN_FAMILIES | {"internvl": ImageOnlyInternVLProcessor}


class ModelNotFoundError(FileNotFoundError):
    """No loadable checkpoint at the given path, S3 prefix or hub id."""


class UnsupportedModelError(ValueError):
    """The checkpoint is not one of the supported families (or not the requested one)."""


def load_vlm(
    path: str,
    *,
    family: str = "auto",
    dtype: str = "float32",
    device: str = "cpu",
    revision: str | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | None = None,
    endpoint_url: str | None = None,
    attn_implementation: str = "sdpa",
) -> VLM:
    """Load model weights (safetensors only) and tokenizer; ``vlm.family`` names the adapter.

    ``attn_implementation`` (sdpa | flash_attention_2 | eager) goes to ``from_pretrained``;
    flash_attention_2 needs the flash_attn package (Qwen2.5-VL's windowed vision attention
    then runs as one varlen call per layer instead of window by window).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    _check_attention(attn_implementation)
    local = resolve_model_path(path, cache_dir=cache_dir, endpoint_url=endpoint_url)
    fam, _ = read_config(
        local, family=family, revision=revision, trust_remote_code=trust_remote_code
    )
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            local,
            revision=revision,
            dtype=DTYPES[dtype],
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
        )
        tokenizer = AutoTokenizer.from_pretrained(
            local, revision=revision, trust_remote_code=trust_remote_code
        )
    except OSError as err:
        raise ModelNotFoundError(f"cannot load weights from {path!r}: {_first_line(err)}") from err
    dev = torch.device(device)
    model = model.to(dev).eval()
    return VLM(fam, model, tokenizer, ADAPTERS[fam], path, dev, local_path=local, revision=revision)


def _check_attention(name: str) -> None:
    if name not in ATTENTION:
        raise ValueError(f"attn_implementation must be one of {', '.join(ATTENTION)}, got {name!r}")
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ImportError(
            "model.attn_implementation: flash_attention_2 needs the flash_attn package "
            "(installed in infra/Dockerfile's GPU image); use sdpa or eager here"
        )


def load_preprocessor(
    path: str,
    *,
    family: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    max_question_tokens: int = 256,
    cache_dir: str | None = None,
    endpoint_url: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    min_pixels: int | None = None,
) -> Preprocessor:
    """Load only the processor and tokenizer (no weights), for CPU preprocessing.

    ``max_pixels`` / ``min_pixels`` bound Qwen2.5-VL's image resize (see
    `resprune.models.qwen_processor.limit_pixels`); other families ignore them.
    """
    local = resolve_model_path(path, cache_dir=cache_dir, endpoint_url=endpoint_url)
    fam, config = read_config(
        local, family=family, revision=revision, trust_remote_code=trust_remote_code
    )
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    if fam in IMAGE_ONLY_FAMILIES:
        processor = _image_processor(local, IMAGE_ONLY_FAMILIES[fam], kwargs)
    else:
        processor = AutoProcessor.from_pretrained(local, **kwargs)
    if fam in QWEN_FAMILIES:
        limit_pixels(processor.image_processor, max_pixels=max_pixels, min_pixels=min_pixels)
    if not getattr(processor, "chat_template", None):
        raise UnsupportedModelError(
            f"{path!r} has no chat template (chat_template.jinja / chat_template.json); "
            "the prompt format of an instruction-tuned checkpoint is needed"
        )
    context = config.text_config.max_position_embeddings
    return Preprocessor(processor, fam, context=context, max_question_tokens=max_question_tokens)


def _image_processor(local: str, image_only: type, kwargs: dict):
    """AutoProcessor, unless it fails or silently returns a bare tokenizer (no torchvision)."""
    try:
        processor = AutoProcessor.from_pretrained(local, **kwargs)
    except (ImportError, OSError):  # the video processor needs torchvision (or its config)
        processor = None
    if getattr(processor, "image_processor", None) is None:
        processor = image_only.from_pretrained(local, **kwargs)
    return processor


def read_config(
    local: str, *, family: str, revision: str | None, trust_remote_code: bool
) -> tuple[str, object]:
    """The checkpoint's config and family; raises if it is missing or unsupported."""
    if Path(local).is_dir() and not (Path(local) / "config.json").is_file():
        raise ModelNotFoundError(f"no model config at {local!r}: config.json is missing")
    try:
        config = AutoConfig.from_pretrained(
            local, revision=revision, trust_remote_code=trust_remote_code
        )
    except OSError as err:
        raise ModelNotFoundError(f"no model config at {local!r}: {_first_line(err)}") from err
    except ValueError as err:  # unknown model_type, or custom code without trust_remote_code
        raise UnsupportedModelError(f"cannot use {local!r}: {_first_line(err)}") from err
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r} at {local!r}; supported: {', '.join(FAMILIES)}"
        )
    if family not in ("auto", model_type):
        raise UnsupportedModelError(f"family {family!r} requested but {local!r} is {model_type!r}")
    return model_type, config


def resolve_model_path(
    path: str, *, cache_dir: str | None = None, endpoint_url: str | None = None
) -> str:
    """A local folder for ``path``: itself, an S3 download in the cache, or the hub id as is."""
    if path.startswith("s3://"):
        return str(fetch_s3_prefix(path, cache_dir=cache_dir, endpoint_url=endpoint_url))
    looks_local = path.startswith(("/", ".", "~")) or os.path.exists(path)
    if looks_local and not Path(path).expanduser().is_dir():
        raise ModelNotFoundError(f"model folder {path!r} does not exist")
    return str(Path(path).expanduser()) if looks_local else path


def fetch_s3_prefix(
    uri: str, *, cache_dir: str | None = None, endpoint_url: str | None = None
) -> Path:
    """Download ``uri`` once into the cache; reuse it while sizes and ETags match the listing.

    The endpoint is ``endpoint_url`` when given, else the standard AWS_* environment.
    """
    import fsspec

    prefix = uri.removeprefix("s3://").rstrip("/")
    root = Path(cache_dir or os.environ.get("RESPRUNE_CACHE_DIR", "~/.cache/resprune/models"))
    dest = root.expanduser() / hashlib.sha256(prefix.encode()).hexdigest()[:16]
    try:
        endpoint = {"endpoint_url": endpoint_url} if endpoint_url else {}
        # a fresh instance: a cached one would list stale ETags
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **endpoint)
        listing = fs.find(prefix, detail=True)
        manifest = {
            cache_relpath(key, prefix): {"size": info["size"], "etag": info.get("ETag")}
            for key, info in listing.items()
        }
        if not manifest:
            raise ModelNotFoundError(f"no objects under {uri!r}")
        with _locked(dest.with_name(dest.name + ".lock")):
            if not _cache_valid(dest, manifest):
                _download(fs, prefix, manifest, dest)
    except (OSError, ValueError) as err:
        if isinstance(err, ModelNotFoundError):
            raise
        raise ModelNotFoundError(f"cannot fetch {uri!r}: {_first_line(err)}") from err
    return dest


def cache_relpath(key: str, prefix: str) -> str:
    """Where object ``key`` (listed under ``prefix``, both ``bucket/...``) goes in the cache
    entry: its path after the prefix, refused when it could land outside the entry.

    S3 keys are strings, not paths: AWS stores ``a/../../x`` or ``a//x`` as written. A key
    with a ``..``, ``.`` or empty part, or one not under the prefix, raises
    `ModelNotFoundError` (the whole download is refused; nothing is written).
    """
    rel = key[len(prefix) + 1 :] if key.startswith(prefix + "/") else None
    parts = rel.split("/") if rel else []
    if not parts or any(p in ("", ".", "..") for p in parts) or Path(rel).is_absolute():
        raise ModelNotFoundError(
            f"refusing s3://{key}: not a plain relative path under s3://{prefix}/ "
            "(a '..', '.', empty or absolute part would escape the model cache folder)"
        )
    return rel


def _download(fs, prefix: str, manifest: dict, dest: Path) -> None:
    """Fetch into a temporary sibling, verify sizes, then swap it in (readers never see halves)."""
    tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for rel in manifest:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        fs.get(f"{prefix}/{rel}", str(tmp / rel))
    for rel, meta in manifest.items():
        if (tmp / rel).stat().st_size != meta["size"]:
            raise ModelNotFoundError(f"size mismatch for s3://{prefix}/{rel} after download")
    (tmp / MANIFEST).write_text(json.dumps(manifest, sort_keys=True))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def _cache_valid(dest: Path, manifest: dict) -> bool:
    try:
        if json.loads((dest / MANIFEST).read_text()) != manifest:
            return False
        return all((dest / rel).stat().st_size == m["size"] for rel, m in manifest.items())
    except (OSError, ValueError):
        return False


@contextmanager
def _locked(path: Path):
    """An exclusive file lock: one download per cache entry across processes on a node."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
