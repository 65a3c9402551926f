"""Charts of the cost report as standalone SVG text (matplotlib, Agg backend, no display).

Each function takes the report dict and returns an SVG document, or None when there is
nothing to draw. Text is drawn as paths (`svg.fonttype = "path"`), so no data-derived string
becomes SVG markup and the files look the same on every machine; each chart gets its own
id salt so several can be inlined in one HTML page. Non-goals: layout of the report itself.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from pipeline.report.content import STAGE_NAMES

COLORS = {"used": "#1f77b4", "billed": "#7f7f7f", "unpruned": "#d62728", "flops": "#ff7f0e"}


def _svg(fig: plt.Figure, salt: str) -> str:
    buffer = io.StringIO()
    with plt.rc_context({"svg.fonttype": "path", "svg.hashsalt": salt}):
        fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    return buffer.getvalue()


def hours_chart(report: dict[str, Any]) -> str | None:
    """Bars: GPU hours used, billed, estimated unpruned (with 95% CI) and the FLOPs estimate."""
    bars = [
        ("used", report["gpu_hours_used"], None),
        ("billed", report["gpu_hours_billed"], None),
        ("unpruned", report["gpu_hours_unpruned_est"], report["gpu_hours_unpruned_ci"]),
        ("flops", report["gpu_hours_unpruned_flops"], None),
    ]
    bars = [b for b in bars if b[1] is not None]
    labels = {
        "used": "used",
        "billed": "billed",
        "unpruned": "unpruned\n(measured)",
        "flops": "unpruned\n(FLOPs)",
    }
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for x, (key, value, ci) in enumerate(bars):
        err = None if ci is None else [[value - ci[0]], [ci[1] - value]]
        ax.bar(x, value, color=COLORS[key], yerr=err, capsize=6)
    ax.set_xticks(range(len(bars)), [labels[k] for k, _, _ in bars])
    ax.set_ylabel("GPU hours")
    ax.set_title("GPU hours: pruned run vs estimated unpruned")
    return _svg(fig, "hours")


def stage_chart(report: dict[str, Any]) -> str | None:
    """Horizontal bars: seconds spent per stage, summed over items."""
    stages = report["profile"]["stage_seconds"]
    if not stages:
        return None
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.5 * len(stages)))
    names = list(stages)
    ax.barh([STAGE_NAMES.get(n, n) for n in names], [stages[n] for n in names], color="#2ca02c")
    ax.invert_yaxis()
    ax.set_xlabel("seconds (sum over items)")
    ax.set_title("Time per stage")
    return _svg(fig, "stages")


def distribution_chart(report: dict[str, Any]) -> str | None:
    """Histograms of the kept-token fraction and the retained energy per image."""
    prof = report["profile"]
    if not sum(prof["kept_fraction_hist"]) and not sum(prof["retained_energy_hist"]):
        return None
    edges = prof["bins"]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    panels = (
        ("kept_fraction_hist", "kept / visual tokens"),
        ("retained_energy_hist", "retained energy"),
    )
    for ax, (key, title) in zip(axes, panels, strict=True):
        ax.stairs(prof[key], edges, fill=True, color="#9467bd")
        ax.set_xlim(0, 1)
        ax.set_title(title)
        ax.set_ylabel("items")
    return _svg(fig, "distributions")


def kept_tokens_chart(report: dict[str, Any]) -> str | None:
    """Histogram of kept image tokens per item (what the LLM saw of each image)."""
    dist = report["profile"]["kept_tokens"]
    if not dist["counts"]:
        return None
    edges = dist["edges"]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.stairs(dist["counts"], edges, fill=True, color="#17becf")
    if len(edges) == 2:  # one value: a bar at least a token wide, centred on it
        ax.set_xlim(edges[0] - 4, edges[-1] + 4)
    ax.set_xlabel("kept image tokens per item")
    ax.set_ylabel("items")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    keep = report.get("config", {}).get("keep")
    ax.set_title("Kept tokens per item" + (f" (keep {keep})" if keep else ""))
    return _svg(fig, "kept-tokens")


def trend_chart(report: dict[str, Any]) -> str | None:
    """GPU hours per night: used vs estimated unpruned (95% CI band); needs two nights."""
    nights = report["nights"]
    if len(nights) < 2:
        return None
    dates = [str(n["run_date"]) for n in nights]
    x = range(len(nights))
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.plot(x, [n["gpu_hours_used"] for n in nights], "o-", color=COLORS["used"], label="used")
    est = [n["gpu_hours_unpruned_est"] for n in nights]
    ax.plot(
        x,
        [float("nan") if v is None else v for v in est],
        "s-",
        color=COLORS["unpruned"],
        label="unpruned (measured)",
    )
    cis = [n["gpu_hours_unpruned_ci"] or [float("nan")] * 2 for n in nights]
    ax.fill_between(
        x,
        [c[0] for c in cis],
        [c[1] for c in cis],
        color=COLORS["unpruned"],
        alpha=0.2,
        label="95% CI",
    )
    ax.set_xticks(list(x), dates, rotation=30, ha="right")
    ax.set_ylabel("GPU hours")
    ax.set_title("Savings over nights")
    ax.legend(loc="best")
    return _svg(fig, "trend")


CHARTS: dict[str, Callable[[dict[str, Any]], str | None]] = {
    "hours.svg": hours_chart,
    "stages.svg": stage_chart,
    "distributions.svg": distribution_chart,
    "kept_tokens.svg": kept_tokens_chart,
    "trend.svg": trend_chart,
}


def render_charts(report: dict[str, Any]) -> dict[str, str]:
    """All charts that have data, by file name."""
    drawn = {name: draw(report) for name, draw in CHARTS.items()}
    return {name: svg for name, svg in drawn.items() if svg}
