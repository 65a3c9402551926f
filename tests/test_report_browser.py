"""The HTML report opens in a real headless browser (Debian's chromium) and its charts render.

Skipped with a reason where chromium is not installed (`.ci/run` installs it in CI). The
check is on pixels: the screenshot must hold the charts' own colours, not just text.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline.report import write_report
from tests.report_helpers import rows, run_json, write_output

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
CHART_COLOURS = {  # hours: used, unpruned; distributions; stages
    "used": (0x1F, 0x77, 0xB4),
    "unpruned": (0xD6, 0x27, 0x28),
    "histogram": (0x94, 0x67, 0xBD),
    "stages": (0x2C, 0xA0, 0x2C),
}


def screenshot(html: Path, png: Path, profile: Path, size: str = "1200,5000") -> np.ndarray:
    """Render `html` with headless chromium and return the screenshot as an RGB array."""
    from PIL import Image

    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}"]
    cmd += [f"--window-size={size}", html.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert png.exists(), (
        f"chromium wrote no screenshot (rc {done.returncode}): {done.stderr[-2000:]}"
    )
    return np.asarray(Image.open(png).convert("RGB")).astype(np.int16)


def _pixels_near(image: np.ndarray, rgb: tuple[int, int, int], tol: int = 12) -> int:
    return int((np.abs(image - np.array(rgb)).max(axis=-1) <= tol).sum())


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_html_report_renders_with_charts_in_chromium(tmp_path: Path) -> None:
    uri = str(tmp_path / "out")
    for i, date in enumerate(["2026-11-23", "2026-11-24"]):
        data = rows(120, run_date=date, shadow=30, errors=2, seed=i)
        write_output(f"{uri}/run_date={date}", data, [run_json(run_date=date)])
    written = write_report(uri, formats=("html",))
    assert set(written) >= {"html", "hours.svg", "trend.svg"}
    image = screenshot(Path(written["html"]), tmp_path / "shot.png", tmp_path / "profile")
    non_white = int((image.min(axis=-1) < 240).sum())
    assert non_white > 0.05 * image.shape[0] * image.shape[1] / 10, "page looks blank"
    buckets = image // 16
    colours = len(np.unique(buckets[..., 0] * 256 + buckets[..., 1] * 16 + buckets[..., 2]))
    assert colours >= 8, f"only {colours} colour buckets: charts did not render"
    for name, rgb in CHART_COLOURS.items():
        assert _pixels_near(image, rgb) > 500, f"the {name} chart colour is missing"
