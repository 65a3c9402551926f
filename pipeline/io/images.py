"""Encoded image bytes -> a safe RGB ``PIL.Image``, or an `ItemError` naming the cause.

Follows the validation order of RELIABILITY.md §3.5: byte caps, lazy open, pixel/aspect
caps *before* decoding (bombs and 1xN images never reach ``load()`` or the processor),
strict decode (truncated files are errors, never silently filled in), EXIF rotation, and
explicit mode normalisation (16-bit rescaled, alpha composited on white, CMYK converted).
Animated images use their first frame. Non-goal: resizing (the model's processor does it).

Causes: empty, too_large_bytes, undecodable, bomb_or_too_large, bad_aspect, truncated,
unsupported_mode, fetch_failed (documented in `pipeline.faults.ITEM_CAUSES`).
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
import pyarrow.fs as pafs
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pipeline import faults
from resprune.items import ItemError

ImageFile.LOAD_TRUNCATED_IMAGES = False
_OBJECT_REPR = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")
Image.MAX_IMAGE_PIXELS = None  # our own cap below replaces Pillow's warning/bomb heuristics


def decode_image(
    data: bytes | None, *, max_bytes: int, max_pixels: int, max_aspect: float
) -> Image.Image:
    """Decode bytes into an RGB image within the caps; raises ItemError(cause, message)."""
    if data is None or len(data) == 0:
        raise ItemError("empty", "image is null or 0 bytes")
    if len(data) > max_bytes:
        raise ItemError("too_large_bytes", f"image has {len(data)} bytes > cap {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ItemError(
            "undecodable", f"not a readable image ({decoder_message(exc)}; starts {data[:8]!r})"
        ) from None
    _check_geometry(*img.size, max_pixels=max_pixels, max_aspect=max_aspect)
    try:
        img.load()
    except (OSError, ValueError, SyntaxError) as exc:
        if "truncated" in str(exc):
            raise ItemError("truncated", f"decode failed: {exc}") from None
        raise ItemError("undecodable", f"decode failed: {decoder_message(exc)}") from None
    img = ImageOps.exif_transpose(img) or img
    return to_rgb(img)


def from_pixels(
    value: np.ndarray | Image.Image, *, max_pixels: int, max_aspect: float
) -> Image.Image:
    """An already decoded image (Ray Data ``read_images`` arrays, a user's PIL or numpy rows)
    -> RGB within the same pixel and aspect caps; raises ItemError."""
    if isinstance(value, Image.Image):
        _check_geometry(*value.size, max_pixels=max_pixels, max_aspect=max_aspect)
        return to_rgb(value)
    arr = np.asarray(value)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ItemError("unsupported_mode", f"pixel array of shape {arr.shape} is not HxW[xC]")
    _check_geometry(arr.shape[1], arr.shape[0], max_pixels=max_pixels, max_aspect=max_aspect)
    if arr.dtype != np.uint8:
        raise ItemError("unsupported_mode", f"pixel array of dtype {arr.dtype} (uint8 expected)")
    return to_rgb(Image.fromarray(np.ascontiguousarray(arr)))


def decoder_message(exc: BaseException) -> str:
    """Pillow's message without the reprs of our in-memory buffers (``<_io.BytesIO object
    at 0x...>``), which name nothing a user can find."""
    text = _OBJECT_REPR.sub("", str(exc)).strip().rstrip(":").strip()
    return f"Pillow: {text}" if text else f"Pillow: {type(exc).__name__}"


def _check_geometry(width: int, height: int, *, max_pixels: int, max_aspect: float) -> None:
    if width < 1 or height < 1:
        raise ItemError("bad_aspect", f"image is {width}x{height}")
    if width * height > max_pixels:
        raise ItemError(
            "bomb_or_too_large", f"image is {width}x{height} = {width * height} px > {max_pixels}"
        )
    aspect = max(width, height) / min(width, height)
    if aspect > max_aspect:
        raise ItemError(
            "bad_aspect", f"image is {width}x{height}: aspect {aspect:.0f} > {max_aspect}"
        )


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: 16/32-bit rescaled to 8-bit, alpha composited on white."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise ItemError("unsupported_mode", f"mode {mode} holds non-finite values")
        hi = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(np.rint(arr / hi * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ItemError("unsupported_mode", f"cannot convert mode {mode} to RGB: {exc}") from None


def fetch_bytes(fs: pafs.FileSystem, path: str, *, max_bytes: int) -> bytes:
    """Read an image file (local or S3), refusing files above the byte cap.

    Transient storage faults are retried (`pipeline.faults.retry`) and, when they persist,
    raise `TransientFault` (the row is deferred, not failed); a missing or refused file is
    the item's fault (``fetch_failed``).
    """
    try:
        return faults.retry(lambda: _read(fs, path, max_bytes), what=f"fetch {path}", attempts=3)
    except faults.TransientFault:
        raise
    except OSError as exc:
        raise ItemError("fetch_failed", f"cannot read {path}: {exc}") from None


def _read(fs: pafs.FileSystem, path: str, max_bytes: int) -> bytes:
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise ItemError("fetch_failed", f"{path} does not exist")
    if info.size is not None and info.size > max_bytes:
        raise ItemError("too_large_bytes", f"{path} has {info.size} bytes > cap {max_bytes}")
    with fs.open_input_stream(path) as f:
        return f.read()
