"""The eval's files: eval.md, eval.json, eval.html (chart and overlays inlined), the chart
as SVG, and predictions.parquet (every item under every configuration, with its scores).

Blocks are rendered by the cost report's renderers, which escape every data-derived string
(answers, questions and ids are untrusted) and give the HTML page a CSP with no scripts and
no network. Non-goals: computing numbers (see `summary`).
"""

from __future__ import annotations

import json
from typing import Any

import matplotlib.pyplot as plt
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.eval.spec import REFERENCE
from pipeline.eval.summary import METRICS
from pipeline.io.storage import filesystem, join
from pipeline.report.charts import _svg
from pipeline.report.content import TINY, Block, num
from pipeline.report.render import to_html, to_markdown

CHART = "relative_vs_tokens.svg"
HEADER = [
    "config",
    "kept tokens/item",
    "LLM prompt tokens/item",
    "new tokens/item",
    "s/item",
    "VQA acc",
    "exact match",
    "token F1",
    "relative",
    "errors",
]


def blocks(name: str, model: str, summary: dict[str, Any], problems: list[str]) -> list[Block]:
    """What eval.md and eval.html say, in order."""
    gate = summary["gate"]
    out = [
        Block("h1", f"Eval: {name}"),
        Block(
            "p",
            f"Model {model}; {summary['items']} items, {summary['common_items']} scored "
            f"under every configuration; relative = {summary['metric']} / none's.",
        ),
    ]
    if summary.get("tiny_random_model"):
        out.append(Block("note", TINY))
    out += [
        Block("table", header=HEADER, rows=[_row(k, c) for k, c in summary["configs"].items()]),
        Block(
            "p",
            f"Configured pruner {gate['config']}: relative performance {num(gate['relative'])}.",
        ),
    ]
    unknown = why_unknown(summary)
    if unknown:
        out.append(Block("note", unknown))
    else:
        out += [
            Block("h2", "At equal kept tokens"),
            Block(
                "p",
                "Relative performance interpolated between each pruner's fixed budgets at the "
                "kept tokens per item (what the LLM saw) of the configured method and of each "
                "energy budget (its mean); an energy budget's own row has its value at its "
                "mean only; blank outside a pruner's measured range.",
            ),
            _equal_table(summary["equal_tokens"]),
        ]
    out.append(Block("chart", CHART))
    if problems:
        out.append(Block("note", f"{len(problems)} item(s) not scored: " + "; ".join(problems)))
    return out


def why_unknown(summary: dict[str, Any]) -> str | None:
    """Why relative performance is unknown (nothing scored, or the reference scored 0)."""
    metric, n = summary["metric"], summary["common_items"]
    if not n:
        return (
            "Relative performance is unknown: no item was answered ok under every "
            "configuration with reference answers, so nothing was scored (see the errors "
            "column and the items not scored)."
        )
    if summary["configs"][REFERENCE][metric] == 0:
        return (
            f"Relative performance is unknown: the unpruned reference (none) scored 0 "
            f"{metric} on the {n} scored item(s), so no configuration can be compared with it "
            f"(the gate fails). The chart shows the {metric} itself."
        )
    return None


def _row(label: str, c: dict[str, Any]) -> list[str]:
    per_item = ("kept_tokens", "prompt_tokens", "new_tokens", "gpu_seconds")
    return [
        label,
        *(num(c[f"{name}_per_item"]) for name in per_item),
        *(num(c[m]) for m in METRICS),
        num(c["relative"]),
        str(c["items_error"]),
    ]


def _equal_table(eq: dict[str, Any]) -> Block:
    header = ["method / energy budget", *(f"{x:.1f} tokens" for x in eq["levels"])]
    rows = [[m, *("" if v is None else num(v) for v in vals)] for m, vals in eq["relative"].items()]
    return Block("table", header=header, rows=rows)


def chart(summary: dict[str, Any], threshold: float | None) -> str | None:
    """Relative performance against kept tokens per item, one line per method (energy
    budgets as stars); the metric itself when relative is unknown; None when nothing scored."""
    metric = summary["metric"]
    relative = why_unknown(summary) is None
    key = "relative" if relative else metric
    series: dict[str, list[tuple[float, float]]] = {}
    adaptive = set()
    for c in summary["configs"].values():
        if c[key] is not None and c["kept_tokens_per_item"] is not None:
            series.setdefault(c["series"], []).append((c["kept_tokens_per_item"], c[key]))
            adaptive |= {c["series"]} if c["adaptive"] else set()
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for name, pts in sorted(series.items()):
        xs, ys = zip(*sorted(pts), strict=True)
        style = "*" if name in adaptive else "o-" if len(pts) > 1 else "o"
        ax.plot(xs, ys, style, label=name, markersize=10 if name in adaptive else 6)
    if relative:
        ax.axhline(1.0, color="#999", lw=0.8)
        if threshold is not None:
            ax.axhline(threshold, color="#d62728", ls="--", lw=0.8, label=f"gate {threshold:g}")
    ax.set_xlabel("kept image tokens per item (what the LLM saw)")
    ax.set_ylabel(f"relative {metric}" if relative else metric)
    title = "Relative performance vs kept tokens"
    ax.set_title(title if relative else f"{metric} vs kept tokens (relative unknown)")
    ax.legend(loc="best", fontsize=8)
    return _svg(fig, "eval")


def write_all(
    uri: str,
    storage: Any,
    *,
    summary: dict[str, Any],
    table: pa.Table,
    page: list[Block],
    charts: dict[str, str],
    html_extra: list[Block],
) -> dict[str, str]:
    """Write every file under ``uri``; returns name -> path. ``charts``: SVGs by name."""
    fs, root = filesystem(uri, storage)
    fs.create_dir(root, recursive=True)
    files = {
        "eval.json": json.dumps(summary, indent=2, sort_keys=True).encode(),
        "eval.md": to_markdown(page).encode(),
        "eval.html": to_html(page + html_extra, charts).encode(),
    }
    if CHART in charts:
        files[CHART] = charts[CHART].encode()
    written = {}
    for name, data in files.items():
        with fs.open_output_stream(join(root, name)) as f:
            f.write(data)
        written[name] = join(root, name)
    pq.write_table(table, join(root, "predictions.parquet"), filesystem=fs)
    written["predictions.parquet"] = join(root, "predictions.parquet")
    return written
