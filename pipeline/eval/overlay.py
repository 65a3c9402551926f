"""Kept patches drawn over the image: one SVG per (item, configuration), for eval.html.

A square token grid (LLaVA-1.5: 24 x 24) covers the image as the CLIP processor shows it to
the model: the central square, resized. Dropped patches are dimmed and kept ones outlined,
each as one SVG path; the image is embedded as a ``data:`` JPEG, so the page opens offline
(its CSP allows ``data:`` images only). Other layouts (anyres crops, Qwen's dynamic grid)
get no overlay (None): their grids are not recoverable from the output row alone.
"""

from __future__ import annotations

import base64
import io
import math

from PIL import Image

from pipeline.io.images import decode_image

SIDE = 240  # drawn size in pixels


def square_view(data: bytes, *, max_pixels: int, max_bytes: int) -> Image.Image:
    """The image's central square resized to SIDE x SIDE (what the CLIP processor crops)."""
    img = decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels, max_aspect=1e9)
    w, h = img.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    return img.crop(box).resize((SIDE, SIDE), Image.Resampling.BICUBIC)


def overlay_svg(view: Image.Image, kept: list[int], visual_tokens: int) -> str | None:
    """SVG of ``view`` with the kept patches of a square grid outlined; None if not square."""
    grid = math.isqrt(visual_tokens)
    if grid * grid != visual_tokens or not grid:
        return None
    cell = SIDE / grid
    keep = set(kept)
    dropped = _cells(cell, grid, (i for i in range(visual_tokens) if i not in keep))
    outlined = _cells(cell, grid, sorted(keep))
    buf = io.BytesIO()
    view.save(buf, format="JPEG", quality=80)
    href = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{SIDE}" height="{SIDE}" '
        f'viewBox="0 0 {SIDE} {SIDE}"><image href="{href}" width="{SIDE}" height="{SIDE}"/>'
        f'<path d="{dropped}" fill="#000" fill-opacity="0.6"/>'
        f'<path d="{outlined}" fill="none" stroke="#ffd400" stroke-width="1"/></svg>'
    )


def _cells(cell: float, grid: int, indices) -> str:
    """One path of squares, one per token index (row-major grid)."""
    return "".join(
        f"M{(i % grid) * cell:.1f} {(i // grid) * cell:.1f}h{cell:.1f}v{cell:.1f}h-{cell:.1f}z"
        for i in indices
    )
