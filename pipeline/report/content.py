"""What the report says, as format-neutral blocks (headings, paragraphs, tables, charts).

Both renderers (Markdown, HTML) walk the same blocks, so they show the same numbers with
the same rounding. Block text is plain and unescaped: escaping is the renderer's job, and
answers are untrusted. Unknown values print as "unknown", never as a guess.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.report.estimate import MIN_BATCHES

UNKNOWN = "unknown"
BILLED_GAP = 2.0  # billed above this many times the hours used gets a note saying why
TINY = (
    "The checkpoint is one of this project's tiny random-weight test models (resprune.tiny): "
    "the answers are noise and the times describe a toy model, not a real VLM."
)
NO_SUMMARY = "their actors' time is missing from the billed hours."
NO_SHADOW = (
    "No shadow items: the measured estimate is unknown; only the FLOPs-based estimate is shown:"
)
STAGE_NAMES = {
    "preprocess_s": "preprocess (CPU)",
    "vision_s": "vision encoder",
    "select_s": "token selection",
    "generate_s": "generate (LLM)",
}
METHOD = (
    "GPU hours used = sum of per-item GPU seconds (batch device time apportioned to items); "
    "billed = the actors' held time from the run summaries.",
    "Compiling and capturing (each new batch and cache-length shape's compile and CUDA-graph "
    "capture, paid once per actor on a warm-up of that shape) is billed overhead: it is in "
    "the billed hours, never in the hours used or in either side of the shadow ratio.",
    "Shadow sample: per model actor and batch-size bucket, the first model batch and then every "
    "ceil(1 / cost.shadow_fraction)-th is answered again without pruning on the same actor: "
    "its twin, the same items as one batch (split only where an unpruned job's budgets would "
    "split it), before or after the pruned pass (alternating, so warm-state effects land on "
    "both sides), timed by the same clock with compile and capture left out of both.",
    "A twin that fails (out of memory included) is a failed shadow batch: counted, left out of "
    "the ratio, never a failure of the run or a change to its batches.",
    "Time ratio = sum of unpruned / sum of pruned GPU seconds over the shadow batches, per GPU "
    "type and batch-size bucket (1, 2-3, 4-7, ...); each bucket's GPU hours are scaled by its "
    f"own ratio when it has at least {MIN_BATCHES} shadow batches, else by the pooled ratio.",
    "Failed attempts (a batch that raised and was retried item by item, an error item's share "
    "of its batch) count as GPU hours used, and once, unscaled, in the estimate without pruning.",
    "95% CI: percentile bootstrap (2000 seeded draws) that resamples runs, then whole shadow "
    "batches within them (items of one batch share one time and are never resampled apart), "
    "widened to at least the Student-t interval of the time ratio over the n shadow batches "
    "(n - 1 degrees of freedom: very wide with a handful of batches; none with one).",
    "FLOPs cross-check: decoder matmuls + causal attention for the prompt (pruned vs unpruned "
    "prompt tokens) + decode steps + LM head, applied to the generate stage's share of GPU time; "
    "each item counts its own prompt, so an energy budget's per-item kept tokens are used.",
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
    return f"{usd(price)} per GPU hour" if isinstance(price, float | int) else str(price or UNKNOWN)


def _rate(price: Any) -> str:
    return usd(price) if isinstance(price, float | int) else str(price or UNKNOWN)


def _or_unknown(value: Any) -> str:
    return UNKNOWN if value is None else str(value)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _num3(value: float | None) -> str:
    return num(value, 3)


def _col(key: str, fmt: Callable[[Any], str] = num) -> Callable[[dict[str, Any]], str]:
    return lambda record: fmt(record.get(key))


def _table(records: list[dict[str, Any]], columns: list[tuple[str, Callable]]) -> Block:
    """A table with one row per record and one column per (header, cell function)."""
    rows = [[cell(r) for _, cell in columns] for r in records]
    return Block("table", header=[h for h, _ in columns], rows=rows)


HEADLINE = (  # label, hours key, interval key, USD key
    ("GPU hours used (measured per item)", "gpu_hours_used", None, "usd_used"),
    ("GPU hours billed (actors' held time)", "gpu_hours_billed", None, "usd_billed"),
    (
        "of which compiling and capturing (billed overhead, not model time)",
        "gpu_hours_compile",
        None,
        "usd_compile",
    ),
    (
        "GPU hours without pruning (measured on shadow sample)",
        "gpu_hours_unpruned_est",
        "gpu_hours_unpruned_ci",
        None,
    ),
    ("GPU hours saved", "gpu_hours_saved", "gpu_hours_saved_ci", "usd_saved"),
    (
        "GPU hours without pruning (FLOPs model, cross-check)",
        "gpu_hours_unpruned_flops",
        None,
        None,
    ),
)


def _headline(r: dict[str, Any]) -> list[Block]:
    rows = [
        [label, num(r[h]), interval(r[ci]) if ci else "", usd(r[money]) if money else ""]
        for label, h, ci, money in HEADLINE
    ]
    header = ["", "GPU hours", "95% CI", "USD"]
    out = [Block("h2", "GPU hours and money"), Block("table", header=header, rows=rows)]
    out.append(Block("p", f"Price: {_price(r['price'])} ({r['price_source']})."))
    if r.get("runs_without_summary"):
        missing = ", ".join(r["runs_without_summary"])
        text = f"Rows of run(s) {missing} have no _runs/*.json summary: {NO_SUMMARY}"
        out.append(Block("note", text))
    billed, used = r.get("gpu_hours_billed"), r.get("gpu_hours_used")
    if billed and used and billed > BILLED_GAP * used:
        out.append(Block("note", billed_vs_used(billed / used)))
    if r.get("gpu_hours_failed"):
        text = (
            f"GPU hours used include {num(r['gpu_hours_failed'])} h of failed attempts (batches "
            "that raised and were retried item by item, error items' share of their batch); "
            "the estimate without pruning counts them once."
        )
        out.append(Block("note", text))
    counted, rows = r.get("items_processed_by_runs"), r["items_ok"] + r["items_error"]
    if counted is not None and counted != rows:
        text = f"The run summaries count {counted} processed items; the results hold {rows} rows."
        out.append(Block("note", text))
    return [*out, *_shadow_lines(r), *_buckets(r), Block("chart", "hours.svg")]


def _shadow_lines(r: dict[str, Any]) -> list[Block]:
    """The measured ratio and how much the shadow sample knows (n batches, failed twins)."""
    flops = f"FLOPs ratio {ratio(r['flops_ratio'])} ({r['flops_scaling'] or 'shape unknown'})"
    out = []
    if r["shadow_items"]:
        measured = f"Time ratio unpruned/pruned: {ratio(r['time_ratio'])}"
        batches = r["shadow_batches"]
        n = f"{r['shadow_items']} shadow item(s) in {batches} batch(es)"
        few = (
            " (n = 1 batch: one pair says nothing of the spread, so there is no 95% CI)"
            if batches < 2
            else f" (n = {batches} batches: a Student-t interval, wide)"
            if batches < 10
            else ""
        )
        out.append(Block("p", f"{measured} over {n}{few}; {flops}."))
        out += _measured_vs_flops(r)
    else:
        out.append(Block("note", f"{NO_SHADOW} {flops}."))
    if r.get("shadow_batches_failed"):
        text = (
            f"{r['shadow_batches_failed']} shadow batch(es) failed (the unpruned twin raised, "
            "e.g. out of memory): recorded on their rows (shadow_error), left out of the ratio."
        )
        out.append(Block("note", text))
    return out


def billed_vs_used(times: float) -> str:
    """Why the billed hours are far above the hours used."""
    return (
        f"Billed hours are {times:.1f}x the hours used. Used counts only the device time inside "
        "model batches; billed counts each model actor from its start to the end of the run: "
        "loading the weights, compiling, waiting for input and the idle tail included. On a "
        "small or short run that start-up dominates; on a full night the gap shrinks. The "
        "saving below is computed on the hours used."
    )


def _measured_vs_flops(r: dict[str, Any]) -> list[Block]:
    """Why the measured ratio is below the FLOPs ratio, with the stage times that show it."""
    stages = r["profile"]["stage_seconds"]
    device = sum(stages.get(k, 0.0) for k in ("vision_s", "select_s", "generate_s"))
    if not r.get("flops_ratio") or not r.get("time_ratio") or device <= 0:
        return []
    share = {k: stages.get(k, 0.0) / device for k in ("vision_s", "select_s", "generate_s")}
    batch_s = (r["gpu_hours_used"] - (r.get("gpu_hours_failed") or 0.0)) * 3600
    outside = (
        f" {pct(1 - device / batch_s)} of the batches' time falls outside these stages "
        "(padding, copies, bookkeeping) and is not in the FLOPs model either."
        if batch_s > device * 1.01
        else ""
    )
    text = (
        f"Why measured ({ratio(r['time_ratio'])}) and FLOPs ({ratio(r['flops_ratio'])}) differ: "
        "the FLOPs model counts only the language model's arithmetic. Of the device time, the "
        f"vision encoder took {pct(share['vision_s'])} (the same with or without pruning), "
        f"token selection {pct(share['select_s'])} (pruning's own cost) and generation "
        f"{pct(share['generate_s'])}; within generation, decode steps are bound by memory "
        "bandwidth and per-step overheads (kernel launches, sampling, cache updates) that "
        "fewer prompt tokens do not shrink, so time falls by much less than FLOPs." + outside
    )
    return [Block("p", text)]


def _buckets(r: dict[str, Any]) -> list[Block]:
    rows = r.get("ratio_by_batch_size") or []
    if not rows:
        return []
    source = {True: "own shadow batches", False: "pooled (too few shadow batches)"}
    columns = [
        ("GPU type", _col("gpu_type", str)),
        ("batch size", _col("label", str)),
        ("GPU hours", lambda b: num(b["gpu_seconds"] / 3600)),
        ("shadow batches", _col("shadow_batches", str)),
        ("time ratio", _col("ratio", ratio)),
        ("ratio from", lambda b: source[b["own_ratio"]]),
    ]
    return [
        Block("p", "Time ratio by batch size (applied to that size's hours):"),
        _table(rows, columns),
    ]


def _gpu_types(r: dict[str, Any]) -> list[Block]:
    columns = [
        ("GPU type", _col("gpu_type", str)),
        ("USD/GPU hour", _col("usd_per_gpu_hour", _rate)),
        ("hours used", _col("gpu_hours_used")),
        ("hours billed", _col("gpu_hours_billed")),
        ("hours unpruned (est.)", _col("gpu_hours_unpruned_est")),
        ("95% CI", _col("gpu_hours_unpruned_ci", interval)),
        ("hours saved", _col("gpu_hours_saved")),
        ("USD saved", _col("usd_saved", usd)),
        ("shadow items", _col("shadow_items", str)),
    ]
    return [Block("h2", "Per GPU type"), _table(r["by_gpu_type"], columns)]


def _quality(r: dict[str, Any]) -> list[Block]:
    q = r["answer_agreement"]
    out = [Block("h2", f"Quality drift (shadow sample, {q['n']} items)")]
    if not q["n"]:
        return [*out, Block("note", "No shadow items: answer agreement is unknown.")]
    f1 = num(q["token_f1"], 3)
    out.append(Block("p", f"Exact match: {pct(q['exact_match'])}. Token F1: {f1}."))
    columns = [
        ("id", _col("id", _text)),
        ("question", _col("question", _text)),
        ("pruned answer", _col("pruned", _text)),
        ("unpruned answer", _col("unpruned", _text)),
        ("token F1", _col("token_f1", _num3)),
    ]
    if r["quality"]["worst"]:
        out += [Block("p", "Worst disagreements:"), _table(r["quality"]["worst"], columns)]
    return out


def _profile(r: dict[str, Any]) -> list[Block]:
    p = r["profile"]
    prompts = f"{num(p['prompt_tokens_mean'])} / {num(p['prompt_tokens_unpruned_mean'])}"
    rows = [
        ["visual tokens per image (mean)", num(p["visual_tokens_mean"])],
        ["kept tokens per image (mean)", num(p["kept_tokens_mean"])],
        ["kept tokens per image (min / median / p90 / max)", _spread(p["kept_tokens"])],
        ["kept fraction", pct(p["kept_fraction"])],
        ["prompt tokens, pruned / unpruned (mean)", prompts],
        ["retained energy (mean)", num(p["retained_energy_mean"], 3)],
    ]
    stages = [[STAGE_NAMES.get(k, k), num(v)] for k, v in p["stage_seconds"].items()]
    errors = [[cause, str(n)] for cause, n in p["errors_by_cause"].items()] or [["(none)", "0"]]
    return [
        Block("h2", "Pruning profile"),
        Block("table", header=["", "value"], rows=rows),
        Block("chart", "kept_tokens.svg"),
        Block("chart", "distributions.svg"),
        Block("h2", "Time per stage"),
        Block("table", header=["stage", "seconds"], rows=stages),
        Block("chart", "stages.svg"),
        Block("h2", "Errors by cause"),
        Block("table", header=["cause", "items"], rows=errors),
    ]


def _spread(dist: dict[str, Any]) -> str:
    values = [dist[k] for k in ("min", "median", "p90", "max")]
    return " / ".join(str(v) if isinstance(v, int) else num(v, 3) for v in values)


def _nights(r: dict[str, Any]) -> list[Block]:
    if len(r["nights"]) < 2:
        return []
    columns = [
        ("night", _col("run_date", str)),
        ("items ok", _col("items_ok", str)),
        ("items error", _col("items_error", str)),
        ("hours used", _col("gpu_hours_used")),
        ("hours billed", _col("gpu_hours_billed")),
        ("hours unpruned (est.)", _col("gpu_hours_unpruned_est")),
        ("hours saved", _col("gpu_hours_saved")),
        ("USD saved", _col("usd_saved", usd)),
        ("exact match", lambda n: pct(n["answer_agreement"]["exact_match"])),
        ("token F1", lambda n: _num3(n["answer_agreement"]["token_f1"])),
    ]
    trend = [Block("h2", "Trend over nights"), _table(r["nights"], columns)]
    return [*trend, Block("chart", "trend.svg")]


def _runs(r: dict[str, Any]) -> list[Block]:
    """The runs that did something (a rerun that found every row committed is counted in a
    line, not listed as a "finished 0 / 0" row)."""
    idle = [x for x in r["runs"] if _did_nothing(x)]
    runs = [x for x in r["runs"] if not _did_nothing(x)]
    columns = [
        ("run", _col("run_id", _or_unknown)),
        ("night", _col("run_date", _or_unknown)),
        ("status", _col("status", _or_unknown)),
        ("items ok", _col("items_ok", str)),
        ("items error", _col("items_error", str)),
        ("hours used", _col("gpu_hours_used")),
        ("hours billed", _col("gpu_hours_billed")),
        ("shadow items", _col("shadow_items", str)),
    ]
    out = [Block("h2", "Runs"), _table(runs, columns)]
    if idle:
        text = f"{len(idle)} run(s) found every row already committed and did nothing; not listed."
        out.append(Block("p", text))
    return out


def _did_nothing(run: dict[str, Any]) -> bool:
    return (
        run.get("status") == "finished"
        and run.get("items_processed") == 0
        and not run.get("actor_seconds")
    )


def blocks(report: dict[str, Any], charts: set[str]) -> list[Block]:
    """The whole report as blocks; chart blocks only for charts that were drawn."""
    c = report["config"]
    intro = (
        f"Model {_or_unknown(c.get('model'))}, pruner {_or_unknown(c.get('pruner'))} "
        f"(keep {_or_unknown(c.get('keep'))}, alpha {_or_unknown(c.get('alpha'))}); "
        f"{len(report['nights'])} night(s), {len(report['runs'])} run(s); "
        f"items ok {report['items_ok']}, items error {report['items_error']}."
    )
    out = [Block("h1", f"Cost report: {report['source_uri']}"), Block("p", intro)]
    if report.get("tiny_random_model"):
        out.append(Block("note", TINY))
    for part in (_headline, _gpu_types, _quality, _profile, _nights, _runs):
        out += part(report)
    out += [Block("h2", "Method"), *(Block("p", line) for line in METHOD)]
    return [b for b in out if b.kind != "chart" or b.text in charts]
