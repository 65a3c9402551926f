"""The report's public functions: `build_report` (numbers) and `write_report` (files).

`write_report` is what `python -m pipeline report` and the demo call: load the prefix, sum
the runs, estimate, draw, render, and write `_report/` beside the results. Non-goals: the
command line (see `cli.py`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from pipeline.report import charts as charts_mod
from pipeline.report.content import blocks
from pipeline.report.load import Night, load_output, write_text
from pipeline.report.render import to_html, to_markdown
from pipeline.report.stats import RunStats
from pipeline.report.summary import (
    CONFIG_KEYS,
    Run,
    collect_runs,
    profile,
    run_summary,
    scope_summary,
    worst_disagreements,
)

FORMATS = ("md", "html", "json")


def _price_source(runs: Sequence[Run], price: float | None) -> tuple[Any, str]:
    if price is not None:
        return price, "--price"
    prices = {r.price(None) for r in runs if r.stats.used_seconds or r.info.get("actor_seconds")}
    if not prices or None in prices:
        return "unknown", "no price given and not in every run summary; never guessed"
    return (prices.pop(), "run summary") if len(prices) == 1 else ("mixed", "run summaries")


def build_report(
    nights: Sequence[Night], *, price: float | None = None, source_uri: str = "", seed: int = 0
) -> dict[str, Any]:
    """The report dict (`report.json`): contract keys at the top, details below."""
    runs = collect_runs(nights)
    total = sum((r.stats for r in runs), RunStats())
    newest = max(
        runs, key=lambda r: (str(r.info.get("started_at") or ""), not r.info.get("summary_missing"))
    )
    report: dict[str, Any] = {"source_uri": source_uri}
    report.update(scope_summary(runs, price=price, seed=seed))
    report["price"], report["price_source"] = _price_source(runs, price)
    report["config"] = {k: newest.info.get(k) for k in CONFIG_KEYS}
    report["tiny_random_model"] = any(
        (r.info.get("model_shape") or {}).get("tiny_random") for r in runs
    )
    report["quality"] = {**report["answer_agreement"], "worst": worst_disagreements(total)}
    report["profile"] = profile(total)
    report["nights"] = [
        {"run_date": n.run_date, "uri": n.uri, "duplicate_ids": n.duplicate_ids}
        | scope_summary([r for r in runs if r.run_date == n.run_date], price=price, seed=seed)
        for n in nights
    ]
    report["runs"] = [run_summary(r, price) for r in runs]
    report["duplicate_ids"] = sum(n.duplicate_ids for n in nights)
    report["runs_without_summary"] = [
        str(r.info.get("run_id")) for r in runs if r.info.get("summary_missing")
    ]
    processed = [r.info["items_processed"] for r in runs if "items_processed" in r.info]
    report["items_processed_by_runs"] = sum(processed) if processed else None
    return report


def _finite(value: Any) -> Any:
    """The report with non-finite floats as null, so report.json is strict JSON."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_report(
    output_uri: str, *, price: float | None = None, formats: Sequence[str] = FORMATS
) -> dict[str, str]:
    """Write `_report/report.{md,html,json}` (+ chart SVGs) under `output_uri`; returns paths."""
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown report format(s) {sorted(unknown)}; choose from {FORMATS}")
    report = build_report(load_output(output_uri), price=price, source_uri=output_uri)
    written: dict[str, str] = {}
    if "json" in formats:
        text = json.dumps(_finite(report), indent=2, default=str, allow_nan=False)
        written["json"] = write_text(output_uri, "report.json", text)
    if {"md", "html"} & set(formats):
        charts = charts_mod.render_charts(report)
        content = blocks(report, set(charts))
        for name, svg in charts.items():
            written[name] = write_text(output_uri, name, svg)
        if "md" in formats:
            written["md"] = write_text(output_uri, "report.md", to_markdown(content))
        if "html" in formats:
            written["html"] = write_text(output_uri, "report.html", to_html(content, charts))
    return written
