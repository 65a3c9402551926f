"""The nightly gate (`gate:` in the spec), judged at the end of a run over the whole output
prefix, from the run summary and the cost report's numbers (`pipeline.report.build_report`).

Checks (each one the spec leaves unset is not judged): every input id committed; committed
items per billed GPU hour at least a floor; the shadow sample's agreement of pruned with
unpruned answers at least a threshold (quality drift); the kept visual tokens per item
within ``pruning.keep`` on average. A check without data (no shadow items, no billed hours)
is "not judged" and does not fail the gate: the summary says why.
"""

from __future__ import annotations

from typing import Any

from pipeline.spec import EnergyKeepSpec, GateSpec, JobSpec

ROUNDING = 0.5  # a fractional keep rounds each image's budget to the nearest token


def check(name: str, value: Any, limit: Any, passed: bool | None, detail: str) -> dict[str, Any]:
    """One check's record; ``passed`` None means not judged (no data)."""
    return {"check": name, "value": value, "limit": limit, "passed": passed, "detail": detail}


def judge(spec: JobSpec, doc: dict[str, Any], report: dict[str, Any] | None) -> dict[str, Any]:
    """The gate's verdict: {"passed", "failed": [names], "checks": [...]} (``report`` None:
    the prefix could not be read, so the checks that need it fail)."""
    gate: GateSpec = spec.gate or GateSpec()
    checks = []
    if gate.all_ids_committed:
        checks.append(_all_committed(doc))
    if gate.min_items_per_gpu_hour is not None:
        checks.append(_throughput(report, gate.min_items_per_gpu_hour))
    if gate.min_shadow_agreement is not None:
        checks.append(_agreement(report, gate.min_shadow_agreement, gate.agreement))
    if gate.kept_tokens_within_budget:
        checks.append(_kept_budget(report, spec))
    failed = [c["check"] for c in checks if c["passed"] is False]
    return {"passed": not failed, "failed": failed, "checks": checks}


def failure_line(verdict: dict[str, Any]) -> str:
    """One line naming the failed checks and their values."""
    parts = [c["detail"] for c in verdict["checks"] if c["passed"] is False]
    return "gate failed: " + "; ".join(parts)


def _all_committed(doc: dict[str, Any]) -> dict[str, Any]:
    committed = doc["items_processed"] + doc["items_skipped"]
    total, bad = doc["items_total"], len(doc.get("unreadable_shards") or {})
    ok = committed >= total and not bad
    shards = f", {bad} unreadable shard(s)" if bad else ""
    detail = f"{committed} of {total} input ids committed{shards}"
    return check("all_ids_committed", committed, total, ok, detail)


def _unreadable(name: str, limit: Any) -> dict[str, Any]:
    return check(name, None, limit, False, f"{name}: the output prefix could not be read")


def _throughput(report: dict[str, Any] | None, floor: float) -> dict[str, Any]:
    name = "min_items_per_gpu_hour"
    if report is None:
        return _unreadable(name, floor)
    hours = report.get("gpu_hours_billed")
    items = report["items_ok"] + report["items_error"]
    if not hours:
        return check(name, None, floor, None, f"{name}: not judged, no billed GPU hours")
    rate = items / hours
    detail = f"{rate:.1f} items per GPU hour (floor {floor:g}; {items} items, {hours:.4f} h)"
    return check(name, rate, floor, rate >= floor, detail)


def _agreement(report: dict[str, Any] | None, floor: float, metric: str) -> dict[str, Any]:
    name = "min_shadow_agreement"
    if report is None:
        return _unreadable(name, floor)
    value = (report.get("answer_agreement") or {}).get(metric)
    if value is None:
        return check(name, None, floor, None, f"{name}: not judged, no shadow items")
    n = report["answer_agreement"].get("n")
    detail = f"shadow {metric} {value:.3f} over {n} item(s) (threshold {floor:g})"
    return check(name, value, floor, value >= floor, detail)


def _kept_budget(report: dict[str, Any] | None, spec: JobSpec) -> dict[str, Any]:
    name = "kept_tokens_within_budget"
    keep = spec.pruning.keep
    if report is None:
        return _unreadable(name, str(keep))
    prof = report.get("profile") or {}
    kept, visual = prof.get("kept_tokens_mean"), prof.get("visual_tokens_mean")
    if kept is None:
        return check(name, None, None, None, f"{name}: not judged, no answered items")
    if isinstance(keep, EnergyKeepSpec):
        limit, what = float(keep.max), f"keep.max {keep.max}"
    elif isinstance(keep, float) and (not keep.is_integer() or keep == 1.0):
        limit, what = keep * visual + ROUNDING, f"keep {keep} of {visual:.1f} visual tokens"
    else:
        limit, what = float(keep), f"keep {keep}"
    detail = f"kept tokens mean {kept:.2f} (budget {what})"
    return check(name, kept, limit, kept <= limit + 1e-9, detail)
