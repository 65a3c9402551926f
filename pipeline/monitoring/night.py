"""What the on-call sees of one run, from the driver: progress lines while it executes, then
the gate, the end-of-run record and the notification, however the run ends.

`pipeline.job.runner` makes one `Night` per run and calls `running` around the execution,
`finished` with the summary of a run that returned, `failed` with the exception of one that
raised. Nothing here may end or fail the night: each step that cannot be done is one warning
line on stderr. The gate's verdict, the GPU hours pushed and a gate failure are written into
the run summary (``_runs/<run_id>.json``: ``gate``, ``gpu_hours``, ``status``, ``failure``).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any

from pipeline.io.storage import filesystem, join, read_json, redact, write_json
from pipeline.monitoring import gate, metrics, notify, record
from pipeline.monitoring.progress import ProgressLines
from pipeline.monitoring.stderr_filter import drop_lines
from pipeline.output.commit import RUNS
from pipeline.spec import JobSpec


class Night:
    """The monitoring of one run (attempt) of a job."""

    def __init__(
        self, spec: JobSpec, *, run_id: str, run_date: str, started: float, lines: bool
    ) -> None:
        """``lines``: print progress lines (no progress bars: not a terminal)."""
        self.spec, self.run_id, self.run_date = spec, run_id, run_date
        self.started, self.lines = started, lines

    @property
    def summary_uri(self) -> str:
        return redact(f"{self.spec.output.uri.rstrip('/')}/{RUNS}/{self.run_id}.json")

    @contextlib.contextmanager
    def running(self, plan: Any) -> Iterator[None]:
        """Around the execution: Ray's false-alarm advisory dropped, progress lines printed,
        the live ``resprune_run_in_progress`` gauge at 1."""
        interval = self.spec.monitoring.progress_interval_s
        lines = ProgressLines(plan, self.run_id, interval_s=interval) if self.lines else None
        gauge = metrics.RunGauge(self.spec.name, self.run_date)
        gauge.set(1)
        try:
            with drop_lines(), lines or contextlib.nullcontext():
                yield
        finally:
            gauge.set(0)

    def finished(self, doc: dict[str, Any]) -> dict[str, Any]:
        """A run that returned: judge the gate, push the record, notify a failure; returns
        the summary with the gate's verdict (a failed gate fails the run)."""
        try:
            doc = self._judge(doc)
        except Exception as exc:  # the night's answers are committed; say what is missing
            _warn(f"could not judge the end of the run: {type(exc).__name__}: {exc}")
        self._report(doc, doc.get("failure") or "")
        return doc

    def failed(self, error: BaseException) -> None:
        """A run that raised: push the record and notify, from its summary when written."""
        first = (str(error).strip().splitlines() or [""])[0]
        what = redact(f"{type(error).__name__}: {first}")
        doc = self._written() or {}
        doc = {
            "name": self.spec.name,
            "run_id": self.run_id,
            "run_date": self.run_date,
            "output_uri": self.spec.output.uri,
            "wall_seconds": time.time() - self.started,
            **doc,
            "status": "failed",
        }
        doc.setdefault("gpu_hours", _hours(doc, None))
        self._report(doc, doc.get("failure") or what)

    def _judge(self, doc: dict[str, Any]) -> dict[str, Any]:
        wanted = self.spec.gate is not None or self.spec.monitoring.pushgateway
        if not wanted:
            return doc
        report = self._report_numbers()
        doc["gpu_hours"] = _hours(doc, report)
        if self.spec.gate is not None:
            if doc["status"] == "finished":
                doc["gate"] = gate.judge(self.spec, doc, report)
                if not doc["gate"]["passed"]:
                    doc["status"], doc["failure"] = "failed", gate.failure_line(doc["gate"])
            else:
                doc["gate"] = {"passed": None, "detail": "not judged: the run failed"}
        fs, root = filesystem(self.spec.output.uri, self.spec.storage)
        write_json(fs, join(root, RUNS, f"{self.run_id}.json"), doc)
        return doc

    def _report_numbers(self) -> dict[str, Any] | None:
        """The cost report's numbers over the whole output prefix, or None (one warning)."""
        from pipeline.report import build_report
        from pipeline.report.load import load_output

        try:
            return build_report(load_output(self.spec.output.uri))
        except Exception as exc:
            _warn(f"could not read the output prefix for the gate: {type(exc).__name__}: {exc}")
            return None

    def _written(self) -> dict[str, Any] | None:
        """This run's summary as written, if it was."""
        try:
            fs, root = filesystem(self.spec.output.uri, self.spec.storage)
            return read_json(fs, join(root, RUNS, f"{self.run_id}.json"))
        except Exception:
            return None

    def _report(self, doc: dict[str, Any], what: str) -> None:
        m = self.spec.monitoring
        if m.pushgateway:
            record.push(
                m.pushgateway, self.spec.name, record.registry(doc, finished_at=time.time())
            )
        if m.notify and doc.get("status") != "finished":
            notify.send(m.notify, notify.message(doc, what=what, summary_uri=self._uri(doc)))

    def _uri(self, doc: dict[str, Any]) -> str | None:
        return self.summary_uri if "items_total" in doc else None


def _hours(doc: dict[str, Any], report: dict[str, Any] | None) -> dict[str, float | None]:
    """This run's GPU hours: used and billed from its summary, the estimate without pruning
    and the saving from the cost report's line for it (None when unknown)."""
    line = next((r for r in (report or {}).get("runs", []) if r.get("run_id") == doc["run_id"]), {})
    return {
        "used": (doc.get("gpu_seconds") or 0.0) / 3600,
        "billed": (doc.get("actor_seconds") or 0.0) / 3600,
        "unpruned_est": line.get("gpu_hours_unpruned_est"),
        "saved": line.get("gpu_hours_saved"),
    }


def _warn(text: str) -> None:
    print(f"warning: {redact(text)}", file=sys.stderr, flush=True)
