"""Per-configuration numbers of an eval: scores, relative performance, tokens, time, gate.

Scores, and the per-item tokens and seconds beside them, are means over the *common* items:
answered ok under every configuration and with at least one reference, so each
configuration is scored and counted on the same items. Relative performance is a
configuration's mean metric over the reference's (``none``). Kept tokens are what the LLM
saw of each image (LLaVA-NeXT's kept newlines included), so pruners are also compared at
equal kept tokens: each pruner's relative performance is interpolated linearly between its
fixed budgets at the kept-token levels of the configured method and at the mean kept tokens
of every energy budget (never extrapolated). Non-goals: significance tests,
per-question-type breakdowns.
"""

from __future__ import annotations

from statistics import fmean
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.eval.scoring import METRICS, score
from pipeline.eval.spec import REFERENCE

PER_ITEM = (
    "kept_tokens",
    "kept_newlines",
    "visual_tokens",
    "prompt_tokens",
    "new_tokens",
    "gpu_seconds",
)


def score_rows(table: pa.Table, references_column: str) -> tuple[pa.Table, list[str]]:
    """Add one column per metric (null where unscored) and list the rows that cannot be scored."""
    problems: set[str] = set()
    columns: dict[str, list[float | None]] = {name: [] for name in METRICS}
    for row in table.select(["id", "status", "answer", references_column]).to_pylist():
        refs = reference_texts(row[references_column])  # blank ones count
        if not refs:
            problems.add(f"id={row['id']}: {references_column}: no reference answers")
        scores = score(row["answer"], refs) if refs and row["status"] == "ok" else {}
        for name in METRICS:
            columns[name].append(scores.get(name))
    for name, values in columns.items():
        table = table.append_column(name, pa.array(values, pa.float64()))
    return table, sorted(problems)


def reference_texts(value: Any) -> list[str]:
    """A row's reference answers as text: strings, ``{answer: ...}`` structs, or datasets'
    ``Sequence({answer: ...})`` (a struct of lists); None and missing answers are blank."""
    return [_text(r) for r in _listed(value)]


def _listed(value: Any) -> list[Any]:
    """The references of a row: a list, or datasets' Sequence({answer: ...}) struct of lists."""
    if isinstance(value, dict):
        return list(value.get("answer") or [])
    return list(value or [])


def _text(reference: Any) -> str:
    """A reference answer: a string, or a VQA-style {"answer": ...} struct."""
    if isinstance(reference, dict):
        reference = reference.get("answer")
    return "" if reference is None else str(reference)


def summarize(
    table: pa.Table,
    labels: list[str],
    *,
    metric: str,
    gated: str,
    series: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The eval's numbers: one entry per configuration, equal-token comparison, gate.

    ``series``: label -> the curve it belongs to at equal kept tokens (default: its method;
    an energy budget is a series of its own, see `pipeline.eval.spec.series_of`).
    """
    rows = table.to_pylist()
    by_config = {label: [r for r in rows if r["config"] == label] for label in labels}
    scored = [{r["id"] for r in rs if r[metric] is not None} for rs in by_config.values()]
    common = set.intersection(*scored) if scored else set()
    configs = {label: _config(rs, common) for label, rs in by_config.items()}
    ref = configs[REFERENCE][metric]
    for label, c in configs.items():
        c["relative"] = c[metric] / ref if ref else None
        c["series"] = (series or {}).get(label) or c["method"]
        c["adaptive"] = c["series"] == label and c["method"] != REFERENCE
    return {
        "metric": metric,
        "items": len({r["id"] for r in rows}),
        "common_items": len(common),
        "configs": configs,
        "gate": {"config": gated, "relative": configs[gated]["relative"]},
        "equal_tokens": equal_tokens(configs, gated),
    }


def _config(rows: list[dict], common: set[str]) -> dict[str, Any]:
    mine = [r for r in rows if r["id"] in common]
    ok = [r for r in rows if r["status"] == "ok"]
    out: dict[str, Any] = {
        "method": rows[0]["pruner"] if rows else None,
        "keep": rows[0]["keep"] if rows else None,
        "items_ok": len(ok),
        "items_error": len(rows) - len(ok),
    }
    for name in METRICS:
        out[name] = fmean(r[name] for r in mine) if mine else None
    for name in PER_ITEM:  # over the scored items, as the metrics are
        values = [r[name] for r in mine if r[name] is not None]
        out[f"{name}_per_item"] = fmean(values) if values else None
    return out


def equal_tokens(configs: dict[str, dict], gated: str) -> dict[str, Any]:
    """Relative performance per series at the kept-token levels of the gated configuration's
    series and of every energy budget (each at its mean kept tokens per item)."""
    points: dict[str, list[tuple[float, float]]] = {}
    for c in configs.values():
        if c["method"] != REFERENCE and c["relative"] is not None and c["kept_tokens_per_item"]:
            points.setdefault(c["series"], []).append((c["kept_tokens_per_item"], c["relative"]))
    shown = {configs[gated]["series"]} | {c["series"] for c in configs.values() if c["adaptive"]}
    levels = sorted({x for s in shown for x, _ in points.get(s, [])})
    table = {m: [_interpolate(sorted(pts), x) for x in levels] for m, pts in points.items()}
    return {"levels": levels, "relative": table}


def _interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    if not xs[0] - 0.5 <= x <= xs[-1] + 0.5:  # half a token of slack; never extrapolate
        return None
    return float(np.interp(x, xs, ys))


def gate_passes(summary: dict[str, Any], threshold: float) -> bool:
    """True when the configured pruner's relative performance is at least ``threshold``."""
    relative = summary["gate"]["relative"]
    return relative is not None and relative >= threshold
