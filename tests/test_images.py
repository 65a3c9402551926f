"""Bytes -> RGB decoding: every bad-input class of RELIABILITY.md §3 gets its cause."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.io.images import decode_image, fetch_bytes, to_rgb
from resprune.items import ItemError

ASSETS = Path(__file__).resolve().parent.parent / "pipeline" / "assets" / "images"
CAPS = {"max_bytes": 5_000_000, "max_pixels": 40_000_000, "max_aspect": 50.0}


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims a huge size (a decompression bomb's header)."""
    data = encode(Image.new("1", (8, 8)))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    patched = struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return data[:8] + patched + data[8 + 25 :]


def cause_of(data: bytes | None, **caps) -> str:
    with pytest.raises(ItemError) as info:
        decode_image(data, **(CAPS | caps))
    return info.value.cause


@pytest.mark.parametrize(
    ("data", "cause"),
    [
        (None, "empty"),
        (b"", "empty"),
        (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "undecodable"),
        (np.random.default_rng(0).bytes(1024), "undecodable"),
        (b"<html><body>502 Bad Gateway</body></html>", "undecodable"),
        (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "undecodable"),
        (b"\x00\x00\x00\x18ftypheic" + bytes(100), "undecodable"),
    ],
    ids=["null", "zero-bytes", "png-garbage", "random", "html", "svg", "heic"],
)
def test_unreadable_inputs(data: bytes | None, cause: str) -> None:
    assert cause_of(data) == cause


def test_truncated_jpeg_is_not_silently_filled() -> None:
    data = (ASSETS / "chelsea.jpg").read_bytes()
    assert cause_of(data[: len(data) // 2]) == "truncated"


def test_png_cut_to_40_bytes() -> None:
    assert cause_of(encode(Image.new("RGB", (64, 64), "red"))[:40]) == "undecodable"


def test_byte_cap() -> None:
    assert cause_of(encode(Image.new("RGB", (64, 64))), max_bytes=10) == "too_large_bytes"


def test_bomb_refused_from_header_before_decode() -> None:
    t0 = time.perf_counter()
    assert cause_of(png_header_claiming(14000, 14000)) == "bomb_or_too_large"
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("size", [(1, 8000), (8000, 1), (10, 5000), (5000, 24)])
def test_thin_images_refused_before_the_processor(size: tuple[int, int]) -> None:
    t0 = time.perf_counter()
    assert cause_of(encode(Image.new("L", size))) == "bad_aspect"
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("mode", ["CMYK", "L", "LA", "RGBA", "1", "P"])
def test_modes_become_rgb(mode: str) -> None:
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    img = decode_image(encode(Image.new(mode, (20, 10)), fmt), **CAPS)
    assert (img.mode, img.size) == ("RGB", (20, 10))


def test_transparency_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(decode_image(encode(rgba), **CAPS)).min() == 255
    pal = Image.new("P", (4, 4), 0)
    pal.info["transparency"] = 0
    assert np.asarray(decode_image(encode(pal, transparency=0), **CAPS)).min() == 255


def test_sixteen_bit_is_rescaled_not_white() -> None:
    arr = np.full((8, 8), 1000, dtype=np.uint16)
    src = Image.fromarray(arr)
    assert src.mode == "I;16"
    img = decode_image(encode(src), **CAPS)
    value = np.asarray(img)[0, 0, 0]
    assert value == round(1000 / 65535 * 255) and value != 255


def test_exif_rotation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    data = encode(Image.new("RGB", (60, 20), "blue"), "JPEG", exif=exif.tobytes())
    assert decode_image(data, **CAPS).size == (20, 60)


def test_animated_gif_uses_first_frame() -> None:
    frames = [Image.new("P", (16, 16), i) for i in range(5)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert decode_image(buf.getvalue(), **CAPS).size == (16, 16)


def test_float_mode_with_nan_is_unsupported() -> None:
    arr = np.full((4, 4), np.nan, dtype=np.float32)
    with pytest.raises(ItemError) as info:
        to_rgb(Image.fromarray(arr, mode="F"))
    assert info.value.cause == "unsupported_mode"


def test_real_images_decode() -> None:
    for path in sorted(ASSETS.glob("*.[jp][pn]g")):
        assert decode_image(path.read_bytes(), **CAPS).mode == "RGB"


def test_fetch_missing_file(tmp_path: Path) -> None:
    import pyarrow.fs as pafs

    with pytest.raises(ItemError) as info:
        fetch_bytes(pafs.LocalFileSystem(), str(tmp_path / "nope.jpg"), max_bytes=100)
    assert info.value.cause == "fetch_failed"
