"""The end-of-run record pushed to a Prometheus Pushgateway (``monitoring.pushgateway``).

Every run's end (success, failure, failed gate) pushes, in the text exposition format and
grouped by ``job`` = the spec's name: ``resprune_run_items{status}`` (ok, error, skipped:
this run's committed rows and the ids committed earlier), ``resprune_run_gpu_hours{kind}``
(used, billed, unpruned_est, saved; NaN when unknown), ``resprune_run_duration_seconds``,
``resprune_run_success`` (1/0) and, only on success,
``resprune_run_last_success_timestamp_seconds``. The push is a POST (prometheus_client's
``pushadd_to_gateway``): it replaces the metrics of these names in the group and keeps the
others, so a failed night leaves the last success time of the previous one in place (an
alert on its age then fires). A Pushgateway that cannot be reached costs one warning line.
"""

from __future__ import annotations

import math
import sys
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.exposition import basic_auth_handler, default_handler, pushadd_to_gateway

from pipeline.monitoring.urls import safe_url, scrub

TIMEOUT_S = 10.0
HOURS = ("used", "billed", "unpruned_est", "saved")
EXPORTED = {
    "resprune_run_items",
    "resprune_run_gpu_hours",
    "resprune_run_duration_seconds",
    "resprune_run_success",
    "resprune_run_last_success_timestamp_seconds",
}


def registry(doc: dict[str, Any], *, finished_at: float) -> CollectorRegistry:
    """The record of one run (``doc``: its summary, with ``gpu_hours`` and ``status``)."""
    reg = CollectorRegistry()
    items = Gauge("resprune_run_items", "Items of the run by status.", ["status"], registry=reg)
    for status, key in (("ok", "items_ok"), ("error", "items_error"), ("skipped", "items_skipped")):
        items.labels(status=status).set(doc.get(key) or 0)
    hours = Gauge("resprune_run_gpu_hours", "GPU hours of the run.", ["kind"], registry=reg)
    for kind in HOURS:
        value = (doc.get("gpu_hours") or {}).get(kind)
        hours.labels(kind=kind).set(math.nan if value is None else value)
    Gauge("resprune_run_duration_seconds", "Wall time of the run.", registry=reg).set(
        doc.get("wall_seconds") or 0.0
    )
    success = doc.get("status") == "finished"
    Gauge("resprune_run_success", "1 when the run finished and passed its gate.", registry=reg).set(
        int(success)
    )
    if success:
        Gauge(
            "resprune_run_last_success_timestamp_seconds",
            "Unix time the job last finished successfully.",
            registry=reg,
        ).set(finished_at)
    return reg


def push(url: str, job: str, reg: CollectorRegistry) -> bool:
    """POST the record to the Pushgateway at ``url`` grouped by ``job``; a failure is one
    warning line on stderr (the URL shown without path, query or credentials)."""
    parts = urlsplit(url)
    handler = default_handler
    if parts.username:  # credentials in the URL: basic auth, never in the request line
        user, password = parts.username, parts.password or ""

        def handler(url, method, timeout, headers, data):
            return basic_auth_handler(url, method, timeout, headers, data, user, password)

        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        url = urlunsplit(parts._replace(netloc=netloc))
    try:
        pushadd_to_gateway(url, job=job, registry=reg, timeout=TIMEOUT_S, handler=handler)
    except Exception as exc:
        reason = scrub(f"{type(exc).__name__}: {exc}", url)
        print(
            f"warning: could not push the run record to the Pushgateway at {safe_url(url)}: "
            f"{reason}",
            file=sys.stderr,
            flush=True,
        )
        return False
    return True
