"""What the report says, as format-neutral blocks (headings, paragraphs, tables, charts).

Both renderers (Markdown, HTML) walk the same blocks, so they show the same numbers with
the same rounding. Block text is plain and unescaped: escaping is the renderer's job, and
answers are untrusted. Unknown values print as "unknown", never as a guess.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

UNKNOWN = "unknown"
STAGE_NAMES = {
    "preprocess_s": "preprocess (CPU)",
    "vision_s": "vision encoder",
    "select_s": "token selection",
    "generate_s": "generate (LLM)",
}
METHOD = (
    "GPU hours used = sum of per-item GPU seconds (batch device time apportioned to items); "
    "billed = the actors' held time from the run summaries.",
    "Time ratio = sum of unpruned / sum of pruned GPU seconds over the shadow items "
    "(answered both ways on the same actor); unpruned estimate = GPU hours used x ratio, "
    "per GPU type.",
    "95% CI: percentile bootstrap over shadow items (2000 seeded resamples of the ratio of sums).",
    "FLOPs cross-check: decoder matmuls + causal attention for the prompt (pruned vs unpruned "
    "prompt tokens) + decode steps + LM head, applied to the generate stage's share of GPU time.",
    "Quality: exact match and token F1 between pruned and unpruned answers after lower-casing "
    "and removing punctuation and extra whitespace.",
)


@dataclass
class Block:
    """One piece of the report: kind is h1, h2, p, note, table or chart."""

    kind: str
    text: str = ""
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)


def num(value: float | None, digits: int = 4) -> str:
    """A number with `digits` significant digits, no exponent; None -> unknown."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return UNKNOWN
    if value == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:,.{decimals}f}"


def usd(value: float | None) -> str:
    """Dollars with cents; None -> unknown."""
    return UNKNOWN if value is None else f"${value:,.2f}"


def pct(value: float | None) -> str:
    """A share as a percentage with one decimal; None -> unknown."""
    return UNKNOWN if value is None else f"{100 * value:.1f}%"


def interval(ci: list[float] | None, fmt=num) -> str:
    """A 95% interval as "lo – hi"; None -> unknown."""
    return UNKNOWN if ci is None else f"{fmt(ci[0])} – {fmt(ci[1])}"


def ratio(value: float | None) -> str:
    """A multiplicative factor such as 1.83x."""
    return UNKNOWN if value is None else f"{value:.3f}x"


def _price(price: Any) -> str:
    return f"{usd(price)} per GPU hour" if isinstance(price, float | int) else str(price)


def _or_unknown(value: Any) -> str:
    return UNKNOWN if value is None else str(value)


def _headline(r: dict[str, Any]) -> list[Block]:
    rows = [
        ["GPU hours used (measured per item)", num(r["gpu_hours_used"]), "", usd(r["usd_used"])],
        [
            "GPU hours billed (actors' held time)",
            num(r["gpu_hours_billed"]),
            "",
            usd(r["usd_billed"]),
        ],
        [
            "GPU hours without pruning (measured on shadow sample)",
            num(r["gpu_hours_unpruned_est"]),
            interval(r["gpu_hours_unpruned_ci"]),
            "",
        ],
        [
            "GPU hours saved",
            num(r["gpu_hours_saved"]),
            interval(r["gpu_hours_saved_ci"]),
            usd(r["usd_saved"]),
        ],
        [
            "GPU hours without pruning (FLOPs model, cross-check)",
            num(r["gpu_hours_unpruned_flops"]),
            "",
            "",
        ],
    ]
    blocks = [
        Block("h2", "GPU hours and money"),
        Block("table", header=["", "GPU hours", "95% CI", "USD"], rows=rows),
    ]
    price = r["price"]
    blocks.append(
        Block(
            "p",
            f"Price: {_price(price)} ({r['price_source']}).",
        )
    )
    if r["shadow_items"]:
        blocks.append(
            Block(
                "p",
                f"Time ratio unpruned/pruned: {ratio(r['time_ratio'])} "
                f"over {r['shadow_items']} shadow items; "
                f"FLOPs ratio {ratio(r['flops_ratio'])} ({r['flops_scaling'] or 'FLOPs unknown'}).",
            )
        )
    else:
        blocks.append(
            Block(
                "note",
                "No shadow items: the measured estimate is unavailable (unknown); "
                f"only the FLOPs-based estimate is shown (FLOPs ratio {ratio(r['flops_ratio'])}).",
            )
        )
    blocks.append(Block("chart", "hours.svg"))
    return blocks


def _gpu_types(r: dict[str, Any]) -> list[Block]:
    header = [
        "GPU type",
        "USD/GPU hour",
        "hours used",
        "hours billed",
        "hours unpruned (est.)",
        "95% CI",
        "hours saved",
        "USD saved",
        "shadow items",
    ]
    rows = [
        [
            t["gpu_type"],
            usd(p) if isinstance(p := t["usd_per_gpu_hour"], float | int) else str(p or UNKNOWN),
            num(t["gpu_hours_used"]),
            num(t["gpu_hours_billed"]),
            num(t["gpu_hours_unpruned_est"]),
            interval(t["gpu_hours_unpruned_ci"]),
            num(t["gpu_hours_saved"]),
            usd(t["usd_saved"]),
            str(t["shadow_items"]),
        ]
        for t in r["by_gpu_type"]
    ]
    return [Block("h2", "Per GPU type"), Block("table", header=header, rows=rows)]


def _quality(r: dict[str, Any]) -> list[Block]:
    q = r["answer_agreement"]
    blocks = [Block("h2", f"Quality drift (shadow sample, {q['n']} items)")]
    if not q["n"]:
        return [*blocks, Block("note", "No shadow items: answer agreement is unknown.")]
    blocks.append(
        Block("p", f"Exact match: {pct(q['exact_match'])}. Token F1: {num(q['token_f1'], 3)}.")
    )
    worst = r["quality"]["worst"]
    if worst:
        rows = [
            [
                w["id"],
                w["question"] or "",
                w["pruned"] or "",
                w["unpruned"] or "",
                num(w["token_f1"], 3),
            ]
            for w in worst
        ]
        blocks += [
            Block("p", "Worst disagreements:"),
            Block(
                "table",
                header=["id", "question", "pruned answer", "unpruned answer", "token F1"],
                rows=rows,
            ),
        ]
    return blocks


def _profile(r: dict[str, Any]) -> list[Block]:
    p = r["profile"]
    rows = [
        ["visual tokens per image (mean)", num(p["visual_tokens_mean"])],
        ["kept tokens per image (mean)", num(p["kept_tokens_mean"])],
        ["kept fraction", pct(p["kept_fraction"])],
        [
            "prompt tokens, pruned / unpruned (mean)",
            f"{num(p['prompt_tokens_mean'])} / {num(p['prompt_tokens_unpruned_mean'])}",
        ],
        ["retained energy (mean)", num(p["retained_energy_mean"], 3)],
    ]
    stages = [[STAGE_NAMES.get(k, k), num(v)] for k, v in p["stage_seconds"].items()]
    errors = [[cause, str(n)] for cause, n in p["errors_by_cause"].items()] or [["(none)", "0"]]
    return [
        Block("h2", "Pruning profile"),
        Block("table", header=["", "value"], rows=rows),
        Block("chart", "distributions.svg"),
        Block("h2", "Time per stage"),
        Block("table", header=["stage", "seconds"], rows=stages),
        Block("chart", "stages.svg"),
        Block("h2", "Errors by cause"),
        Block("table", header=["cause", "items"], rows=errors),
    ]


def _nights(r: dict[str, Any]) -> list[Block]:
    if len(r["nights"]) < 2:
        return []
    header = [
        "night",
        "items ok",
        "items error",
        "hours used",
        "hours billed",
        "hours unpruned (est.)",
        "hours saved",
        "USD saved",
        "exact match",
        "token F1",
    ]
    rows = [
        [
            str(n["run_date"]),
            str(n["items_ok"]),
            str(n["items_error"]),
            num(n["gpu_hours_used"]),
            num(n["gpu_hours_billed"]),
            num(n["gpu_hours_unpruned_est"]),
            num(n["gpu_hours_saved"]),
            usd(n["usd_saved"]),
            pct(n["answer_agreement"]["exact_match"]),
            num(n["answer_agreement"]["token_f1"], 3),
        ]
        for n in r["nights"]
    ]
    return [
        Block("h2", "Trend over nights"),
        Block("table", header=header, rows=rows),
        Block("chart", "trend.svg"),
    ]


def _runs(r: dict[str, Any]) -> list[Block]:
    header = [
        "run",
        "night",
        "status",
        "items ok",
        "items error",
        "hours used",
        "hours billed",
        "shadow items",
    ]
    rows = [
        [
            str(x.get("run_id")),
            str(x.get("run_date")),
            str(x.get("status", UNKNOWN)),
            str(x["items_ok"]),
            str(x["items_error"]),
            num(x["gpu_hours_used"]),
            num(x["gpu_hours_billed"]),
            str(x["shadow_items"]),
        ]
        for x in r["runs"]
    ]
    return [Block("h2", "Runs"), Block("table", header=header, rows=rows)]


def blocks(report: dict[str, Any], charts: set[str]) -> list[Block]:
    """The whole report as blocks; chart blocks only for charts that were drawn."""
    c = report["config"]
    intro = (
        f"Model {c.get('model') or UNKNOWN}, pruner {c.get('pruner') or UNKNOWN} "
        f"(keep {c.get('keep') or UNKNOWN}, alpha {_or_unknown(c.get('alpha'))}); "
        f"{len(report['nights'])} night(s), {len(report['runs'])} run(s); "
        f"items ok {report['items_ok']}, "
        f"items error {report['items_error']}."
    )
    out = [Block("h1", f"Cost report: {report['source_uri']}"), Block("p", intro)]
    for part in (_headline, _gpu_types, _quality, _profile, _nights, _runs):
        out += part(report)
    out += [Block("h2", "Method"), *(Block("p", line) for line in METHOD)]
    return [b for b in out if b.kind != "chart" or b.text in charts]
