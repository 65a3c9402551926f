"""The notification of a failed, refused or gated night (``monitoring.notify``): one JSON POST
with a Slack-compatible ``text`` and the structured fields beside it.

A receiver that cannot be reached costs one warning line; the URL is never printed whole
(webhook URLs carry their token in the path).
"""

from __future__ import annotations

import json
import sys
import urllib.request
from typing import Any

from pipeline.monitoring.urls import safe_url, scrub

TIMEOUT_S = 10.0


def message(doc: dict[str, Any], *, what: str, summary_uri: str | None) -> dict[str, Any]:
    """The JSON body: ``text`` (job, run date, run id, what failed, where the summary is)
    plus the fields a bot can read."""
    where = summary_uri or "no summary written"
    text = (
        f":rotating_light: resprune job {doc.get('name')} night {doc.get('run_date')} failed "
        f"(run {doc.get('run_id')}): {what}. Summary: {where}"
    )
    fields = (
        "name",
        "run_id",
        "run_date",
        "status",
        "items_total",
        "items_ok",
        "items_error",
        "items_skipped",
        "errors_by_cause",
        "wall_seconds",
        "output_uri",
        "gate",
        "gpu_hours",
    )
    body = {k: doc.get(k) for k in fields}
    return {"text": text, "failure": what, "summary_uri": summary_uri, **body}


def send(url: str, body: dict[str, Any]) -> bool:
    """POST ``body`` as JSON to ``url``; a failure is one warning line on stderr."""
    data = json.dumps(body, default=str).encode()
    request = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            response.read()
    except Exception as exc:
        reason = scrub(f"{type(exc).__name__}: {exc}", url)
        print(
            f"warning: could not send the failure notification to {safe_url(url)}: {reason}",
            file=sys.stderr,
            flush=True,
        )
        return False
    return True
