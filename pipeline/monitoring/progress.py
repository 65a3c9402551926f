"""Progress lines for runs without a terminal (a RayJob's log, CI, cron): one line every
``monitoring.progress_interval_s`` (default a minute) on stderr, e.g.

    progress: 1200/5000 items (24.0%), 3.41 items/s, ETA 18m34s, 7 errors so far

Done means committed by this run: a thread beside the execution lists the output prefix's
commit markers (each marker is read once) and sums this run's. Non-goals: progress bars
(Ray Data draws those on a terminal).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, TextIO

from pipeline.output import prefix


class ProgressLines:
    """Context manager: a thread printing one progress line per interval."""

    def __init__(
        self, plan: Any, run_id: str, *, interval_s: float, out: TextIO | None = None
    ) -> None:
        self.plan, self.run_id, self.interval_s = plan, run_id, interval_s
        self.out = out
        self.known: dict[str, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="resprune-progress", daemon=True)

    def __enter__(self) -> ProgressLines:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                done, errors = self.counts()
            except Exception as exc:  # storage hiccup: say so, try again next time
                self._print(f"progress: unknown ({type(exc).__name__} reading the markers)")
                continue
            elapsed = time.monotonic() - self.started
            self._print(line(done, self.plan.items_pending, errors, elapsed))

    def counts(self) -> tuple[int, int]:
        """(rows, error rows) this run has committed so far."""
        state = prefix.scan(self.plan.out_fs, self.plan.out_root, self.known)
        self.known = state.markers
        mine = [m for m in state.markers.values() if m.get("run_id") == self.run_id]
        return sum(m.get("rows", 0) for m in mine), sum(m.get("items_error", 0) for m in mine)

    def _print(self, text: str) -> None:
        print(text, file=self.out or sys.stderr, flush=True)


def line(done: int, total: int, errors: int, elapsed_s: float) -> str:
    """One progress line: done/total, rate, ETA and errors so far."""
    share = f" ({100 * done / total:.1f}%)" if total else ""
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    eta = duration((total - done) / rate) if rate > 0 and total > done else "unknown"
    if done >= total:
        eta = "0s"
    return (
        f"progress: {done}/{total} items{share}, {rate:.2f} items/s, ETA {eta}, "
        f"{errors} error{'s' if errors != 1 else ''} so far"
    )


def duration(seconds: float) -> str:
    """Seconds as 1h02m, 18m34s or 42s."""
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"
