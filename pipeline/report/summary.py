"""From loaded nights to the report's numbers (the dict that becomes `report.json`).

Pure: runs' summable stats in, a JSON-ready dict out. Per GPU type and batch-size bucket, the
time ratio measured on that type's shadow batches of that size scales the GPU hours of that
size (`estimate.stratified_unpruned`); failed attempts count as used, once, both with and
without pruning. Scopes (a night, the whole prefix) add the types, and their bootstrap draws
(whole batches within resampled runs) add draw by draw for the interval, which is widened to
at least the types' Student-t intervals of their ratios (`estimate.ratio_interval`), so a
small sample says how little it knows.
Money uses `--price` when given, else each run's own `usd_per_gpu_hour`; any unknown price
makes the amount unknown (None). Non-goals: reading files, formatting, charts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.report.estimate import (
    N_BOOT,
    LlmShape,
    agreement,
    flops_scaled_seconds,
    percentile_ci,
    ratio_interval,
    stratified_unpruned,
    time_ratio,
    token_f1,
)
from pipeline.report.load import Night
from pipeline.report.stats import BINS, RunStats, split_by_run

WORST = 10
KEPT_BINS = 24  # most bars in the kept-tokens histogram
CONFIG_KEYS = (
    "model",
    "pruner",
    "keep",
    "alpha",
    "gpu_type",
    "usd_per_gpu_hour",
    "shadow_fraction",
)


@dataclass
class Run:
    """One run: its summary JSON (or the night's newest config when missing) and its stats."""

    info: dict[str, Any]
    stats: RunStats
    run_date: str | None

    def price(self, override: float | None) -> float | None:
        """USD per GPU hour: the override, else the run's own price, else None."""
        return override if override is not None else self.info.get("usd_per_gpu_hour")


def collect_runs(nights: Sequence[Night]) -> list[Run]:
    """Every run of every night, rows grouped by run_id; run summaries without rows kept."""
    runs = []
    for night in nights:
        infos = {str(r.get("run_id")): r for r in night.runs}
        newest = {
            k: v
            for k, v in (night.runs[-1] if night.runs else {}).items()
            if k in (*CONFIG_KEYS, "model_shape")
        }
        groups = split_by_run(night.columns)
        for run_id in dict.fromkeys([*infos, *groups]):
            info = infos.get(run_id) or {**newest, "run_id": run_id, "summary_missing": True}
            shape = LlmShape.from_dict(info.get("model_shape"))
            stats = RunStats.from_rows(groups[run_id], shape) if run_id in groups else RunStats()
            runs.append(Run(info, stats, night.run_date or info.get("run_date")))
    return runs


def _hours(seconds: float | None) -> float | None:
    return None if seconds is None else seconds / 3600


def _money(runs: Sequence[Run], price: float | None, hours_of) -> float | None:
    """Sum of hours x price over runs; None when any run with hours has no price, or when no
    run has one (zero hours at an unknown price print as unknown, not $0.00)."""
    if all(run.price(price) is None for run in runs):
        return None
    total = 0.0
    for run in runs:
        hours = hours_of(run)
        if hours:
            rate = run.price(price)
            if rate is None:
                return None
            total += hours * rate
    return total


def _by_type(runs: Sequence[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(str(run.info.get("gpu_type") or "unknown"), []).append(run)
    return groups


def _flops_hours(runs: Sequence[Run]) -> tuple[float | None, float | None, str | None]:
    """Unpruned GPU hours by the FLOPs model, the pooled FLOPs ratio, and how time was scaled."""
    total, note = 0.0, None
    for run in runs:
        s = run.stats
        if s.flops_pruned is None or s.flops_unpruned is None:
            return None, None, None
        if s.gpu_seconds > 0 and s.flops_pruned > 0:
            scaled, note = flops_scaled_seconds(
                s.gpu_seconds, s.stage_seconds, s.flops_unpruned / s.flops_pruned
            )
            total += scaled + s.failed_seconds
        else:
            total += s.used_seconds
    stats = sum((r.stats for r in runs), RunStats())
    ratio = stats.flops_unpruned / stats.flops_pruned if stats.flops_pruned else None
    return total / 3600, ratio, note


@dataclass
class _TypeEstimate:
    """One GPU type's estimate as an effective ratio (unpruned / used hours) and its draws."""

    used_h: float
    priced_h: float | None  # sum of hours x price, None when a price is unknown
    ratio: float | None
    boots: np.ndarray | None
    buckets: list[dict[str, Any]]
    t_bounds: tuple[float, float] | None = None  # the ratio's Student-t interval, effective

    @classmethod
    def of(cls, group: Sequence[Run], price: float | None, seed: int) -> _TypeEstimate:
        """Stratify the group's hours by batch size and scale them by its shadow batches."""
        stats = sum((r.stats for r in group), RunStats())
        used_s = stats.used_seconds
        priced = _money(group, price, lambda r: r.stats.used_seconds / 3600)
        if used_s == 0:  # nothing ran on this type: it adds nothing, known or not
            return cls(0.0, priced, 1.0, np.ones(N_BOOT), [], (1.0, 1.0))
        est = stratified_unpruned(stats.bucket_seconds, stats.shadow.batches, seed=seed)
        if est.estimate_s is None:
            return cls(used_s / 3600, priced, None, None, est.buckets)
        failed = stats.failed_seconds  # a failure costs the same with or without pruning
        boots = None if est.boots_s is None else (est.boots_s + failed) / used_s
        ratio = (est.estimate_s + failed) / used_s
        shadow = stats.shadow.batches
        pooled, t = time_ratio(shadow.pruned_s, shadow.unpruned_s), None
        bounds = ratio_interval(shadow.pruned_s, shadow.unpruned_s)
        if bounds is not None and pooled:  # the same relative width on the measured part
            t = tuple((est.estimate_s * b / pooled + failed) / used_s for b in bounds)
        return cls(used_s / 3600, priced, ratio, boots, est.buckets, t)  # type: ignore[arg-type]

    def unpruned_h(self, ratio: float | np.ndarray | None) -> float | np.ndarray | None:
        """GPU hours without pruning for a ratio (or an array of bootstrap ratios)."""
        return None if ratio is None else self.used_h * ratio

    def usd_saved(self, ratio: float | np.ndarray | None) -> float | np.ndarray | None:
        """Dollars saved for a ratio (or array); None when a price is unknown."""
        return None if ratio is None or self.priced_h is None else self.priced_h * (ratio - 1)


def _hull(ci: list[float] | None, bounds: list[Any] | None) -> list[float] | None:
    """The bootstrap interval widened to include ``bounds`` (None: no interval at all)."""
    if ci is None or bounds is None or None in bounds:
        return None
    return [min(ci[0], bounds[0]), max(ci[1], bounds[1])]


def _t_side(ests: Sequence[_TypeEstimate], side: int, of: str) -> Any:
    """One side of the types' Student-t intervals, summed (hours or USD); None if unknown."""
    if any(e.t_bounds is None for e in ests):
        return None
    return _total([getattr(e, of)(e.t_bounds[side]) for e in ests])


def _total(values: Sequence[Any]) -> Any:
    """Sum that is None as soon as one part is None (unknown stays unknown)."""
    return None if any(v is None for v in values) else sum(values)


def _type_row(gpu_type: str, group: Sequence[Run], est: _TypeEstimate, price: float | None) -> dict:
    stats = sum((r.stats for r in group), RunStats())
    return {
        "gpu_type": gpu_type,
        "usd_per_gpu_hour": _one_price(group, price),
        "gpu_hours_used": est.used_h,
        "gpu_hours_billed": _billed(group),
        "shadow_items": len(stats.shadow),
        "shadow_batches": len(stats.shadow.batches),
        "time_ratio": est.ratio,
        "gpu_hours_unpruned_est": est.unpruned_h(est.ratio),
        "gpu_hours_unpruned_ci": _hull(
            percentile_ci(est.unpruned_h(est.boots)),
            None if est.t_bounds is None else [est.unpruned_h(b) for b in est.t_bounds],
        ),
        "gpu_hours_saved": None if est.ratio is None else est.used_h * (est.ratio - 1),
        "usd_saved": est.usd_saved(est.ratio),
    }


def _estimate(runs: Sequence[Run], price: float | None, seed: int) -> dict[str, Any]:
    """Measured unpruned hours, savings and their bootstrap draws, summed over GPU types."""
    groups = sorted(_by_type(runs).items())
    ests = [_TypeEstimate.of(group, price, seed + i) for i, (_, group) in enumerate(groups)]
    return {
        "unpruned": _total([e.unpruned_h(e.ratio) for e in ests]),
        "usd_saved": _total([e.usd_saved(e.ratio) for e in ests]),
        "boot_h": _total([e.unpruned_h(e.boots) for e in ests]),
        "boot_usd": _total([e.usd_saved(e.boots) for e in ests]),
        "t_h": [_t_side(ests, s, "unpruned_h") for s in (0, 1)],
        "t_usd": [_t_side(ests, s, "usd_saved") for s in (0, 1)],
        "per_type": [_type_row(t, g, e, price) for (t, g), e in zip(groups, ests, strict=True)],
        "buckets": [
            {"gpu_type": t, **b} for (t, _), e in zip(groups, ests, strict=True) for b in e.buckets
        ],
    }


def _one_price(runs: Sequence[Run], price: float | None) -> float | str | None:
    prices = {r.price(price) for r in runs}
    return prices.pop() if len(prices) == 1 else "mixed"


def _billed(runs: Sequence[Run]) -> float | None:
    seconds = [r.info["actor_seconds"] for r in runs if r.info.get("actor_seconds") is not None]
    return _hours(float(sum(seconds))) if seconds else None


def _compile(runs: Sequence[Run]) -> float | None:
    """Hours the actors spent compiling and capturing new shapes (billed, not in used hours);
    None when no run summary says (runs from before it was recorded)."""
    key = "compile_seconds"
    seconds = [r.info[key] for r in runs if r.info.get(key) is not None]
    return _hours(float(sum(seconds))) if seconds else None


def scope_summary(runs: Sequence[Run], *, price: float | None, seed: int = 0) -> dict[str, Any]:
    """The headline numbers (report.json contract keys and more) over a set of runs."""
    stats = sum((r.stats for r in runs), RunStats())
    used = stats.used_seconds / 3600
    est = _estimate(runs, price, seed)
    boot_h = est["boot_h"]
    unpruned_ci = _hull(percentile_ci(boot_h), est["t_h"])
    flops_h, flops_ratio, flops_note = _flops_hours(runs)
    shadow = stats.shadow
    return {
        "items_ok": stats.items_ok,
        "items_error": stats.items_error,
        "gpu_hours_used": used,
        "gpu_hours_failed": stats.failed_seconds / 3600,
        "gpu_hours_billed": _billed(runs),
        "gpu_hours_compile": _compile(runs),
        "gpu_hours_unpruned_est": est["unpruned"],
        "gpu_hours_unpruned_ci": unpruned_ci,
        "gpu_hours_saved": None if est["unpruned"] is None else est["unpruned"] - used,
        "gpu_hours_saved_ci": None if unpruned_ci is None else [b - used for b in unpruned_ci],
        "usd_used": _money(runs, price, lambda r: r.stats.used_seconds / 3600),
        "usd_billed": _money(runs, price, lambda r: _billed([r])),
        "usd_compile": _money(runs, price, lambda r: _compile([r])),
        "usd_saved": est["usd_saved"] if est["unpruned"] is not None else None,
        "usd_saved_ci": _hull(percentile_ci(est["boot_usd"]), est["t_usd"])
        if isinstance(est["boot_usd"], np.ndarray)
        else None,
        "shadow_items": len(shadow),
        "shadow_batches": len(shadow.batches),
        "shadow_batches_failed": stats.shadow_failed_batches,
        "shadow_gpu_hours": float(shadow.batches.unpruned_s.sum()) / 3600,
        "time_ratio": time_ratio(shadow.batches.pruned_s, shadow.batches.unpruned_s),
        "ratio_by_batch_size": est["buckets"],
        "answer_agreement": agreement(shadow.answers, shadow.shadow_answers),
        "gpu_hours_unpruned_flops": flops_h,
        "flops_ratio": flops_ratio,
        "flops_scaling": flops_note,
        "by_gpu_type": est["per_type"],
    }


def kept_tokens_distribution(counts: Counter, bins: int = KEPT_BINS) -> dict[str, Any]:
    """Kept tokens per item: quantiles and a histogram of at most ``bins`` integer-wide bins
    (an energy budget keeps a different number per item; a fixed keep, one or a few)."""
    if not counts:
        return {"min": None, "median": None, "p90": None, "max": None, "edges": [], "counts": []}
    values = np.repeat(np.array(sorted(counts)), [counts[v] for v in sorted(counts)])
    lo, hi = int(values[0]), int(values[-1])
    width = max(1, -(-(hi - lo + 1) // bins))
    edges = np.arange(lo, hi + width + 1, width)
    hist = np.histogram(values, bins=edges)[0]
    return {
        "min": lo,
        "median": float(np.median(values)),
        "p90": float(np.percentile(values, 90)),
        "max": hi,
        "edges": edges.tolist(),
        "counts": hist.tolist(),
    }


def profile(stats: RunStats) -> dict[str, Any]:
    """Pruning profile: token budgets, retained energy, time per stage, errors by cause."""
    n, e = stats.token_items, stats.energy_items
    return {
        "visual_tokens_mean": stats.visual_tokens / n if n else None,
        "kept_tokens_mean": stats.kept_tokens / n if n else None,
        "kept_tokens": kept_tokens_distribution(stats.kept_counts),
        "kept_fraction": stats.kept_tokens / stats.visual_tokens if stats.visual_tokens else None,
        "prompt_tokens_mean": stats.prompt_tokens / n if n else None,
        "prompt_tokens_unpruned_mean": stats.prompt_tokens_unpruned / n if n else None,
        "retained_energy_mean": stats.energy_sum / e if e else None,
        "bins": BINS.tolist(),
        "kept_fraction_hist": stats.keep_hist.tolist(),
        "retained_energy_hist": stats.energy_hist.tolist(),
        "stage_seconds": dict(stats.stage_seconds),
        "errors_by_cause": dict(stats.errors_by_cause.most_common()),
    }


def worst_disagreements(stats: RunStats, limit: int = WORST) -> list[dict[str, Any]]:
    """The shadow items whose pruned and unpruned answers overlap least (lowest token F1)."""
    s = stats.shadow
    rows = [
        {"id": str(i), "question": q, "pruned": a, "unpruned": b, "token_f1": token_f1(a, b)}
        for i, q, a, b in zip(s.ids, s.questions, s.answers, s.shadow_answers, strict=True)
    ]
    rows = [r for r in rows if r["token_f1"] < 1.0]
    return sorted(rows, key=lambda r: (r["token_f1"], r["id"]))[:limit]


def run_summary(run: Run, price: float | None) -> dict[str, Any]:
    """One run's line in `report.json["runs"]`: its summary's fields plus measured numbers."""
    keep = (
        "run_id",
        "name",
        "run_date",
        "started_at",
        "finished_at",
        "status",
        "items_total",
        "items_processed",
        "items_skipped",
        "actor_seconds",
        "compile_seconds",
        "summary_missing",
        *CONFIG_KEYS,
    )
    line = {k: run.info[k] for k in keep if k in run.info}
    line["run_date"] = line.get("run_date") or run.run_date
    line.update(scope_summary([run], price=price))
    return line
