"""The driver's watch over its Ray cluster while a run executes: actors that cannot start, a
cluster that goes away.

A thread beside the execution, polling every `POLL_S`:

* **Startup.** Until the first model actor is placed (its constructor has begun: the run's
  `Ledger` hears of it before the weights load), it prints one line a minute naming what the
  actors wait for, e.g. ``waiting for 1 model actor: 0 of 1 GPU free (needs 1 GPU, 1 CPU
  each; 3 of 4 CPU free) on the Ray cluster at 10.0.0.5:6379, 60 s so far``. After
  ``execution.startup_timeout_s`` it fails the run with that line: the execution is
  interrupted in its own thread (Ray Data then stops its operators and actors) and the
  caller gets `StartupTimeout`.
* **The cluster going away.** When the cluster's GCS refuses connections for `GONE_AFTER_S`
  (a GCS restart under fault tolerance takes less), ``on_gone`` is called with `ClusterGone`
  from this thread. The execution cannot be stopped cleanly then (its calls into Ray block,
  and Ray's core ends the process about 60 s after losing the GCS), so ``on_gone`` must do
  what is left from storage alone and end the process (`pipeline.job.runner` writes the run
  summary, releases the lease, prints its lines and exits 1).

Non-goals: waiting for CPU-stage actors, and actors that die later (Ray restarts them; the
systemic-fault rules apply).
"""

from __future__ import annotations

import _thread
import ctypes
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

import ray

from pipeline.spec import ExecutionSpec

POLL_S = 2.0
WAIT_LINE_S = 60.0  # one "waiting for" line per this many seconds
GONE_AFTER_S = 15.0  # GCS unreachable this long: the cluster is gone (Ray's core gives 60 s)
SNAPSHOT_S = 10.0  # refresh of the actors' record kept for a summary without the cluster


class StartupTimeout(RuntimeError):
    """No model actor could start within ``execution.startup_timeout_s``."""


class ClusterGone(RuntimeError):
    """The Ray cluster went away while the run was executing."""


class Watchdog:
    """Context manager: watch the cluster while the body (the run's execution) runs."""

    def __init__(
        self,
        execution: ExecutionSpec,
        ledger: Any,
        *,
        on_gone: Callable[[ClusterGone, dict[str, Any]], None],
        out: TextIO | None = None,
    ):
        self.execution, self.ledger, self.on_gone = execution, ledger, on_gone
        self.out = out
        self.failure: StartupTimeout | None = None
        self.address = _gcs_address()
        self.snapshot: dict[str, Any] = {}  # the ledger's actors, refreshed every SNAPSHOT_S
        self._stop = threading.Event()
        self._target = threading.current_thread()
        self._thread = threading.Thread(target=self._watch, name="resprune-watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=POLL_S + 10)

    def settle(self) -> None:
        """After the execution raised: while the cluster is unreachable, wait for the watch
        to declare it gone (``on_gone`` ends the process) or to see it back."""
        deadline = time.monotonic() + GONE_AFTER_S + 4 * POLL_S
        while self._thread.is_alive() and time.monotonic() < deadline:
            if _reachable(self.address):
                return
            time.sleep(POLL_S / 2)

    def _watch(self) -> None:
        placed = False
        snapshot, placed_count = _Ask(self.ledger.snapshot), _Ask(self.ledger.placed)
        next_line = WAIT_LINE_S
        gone_since: float | None = None
        next_snapshot = 0.0
        while not self._stop.wait(POLL_S):
            now = time.monotonic()
            waited = now - self._started
            if not _reachable(self.address):
                gone_since = gone_since if gone_since is not None else now
                if now - gone_since >= GONE_AFTER_S:
                    self._gone(now - gone_since)
                    return
                continue
            gone_since = None
            if now >= next_snapshot:
                self.snapshot = snapshot.answer(self.snapshot)
                next_snapshot = now + SNAPSHOT_S
            placed = placed or placed_count.answer(0) > 0
            if placed:
                continue
            timeout = self.execution.startup_timeout_s
            if waited >= timeout:
                try:  # a late answer must not fail a run whose actor did start
                    placed = ray.get(self.ledger.placed.remote(), timeout=30) > 0
                except Exception:
                    placed = False
                if placed:
                    continue
                self._timeout(time.monotonic() - self._started)
                return
            if waited >= next_line:
                self._say(f"run: {self.waiting_line(waited)}")
                next_line += WAIT_LINE_S

    def waiting_line(self, waited: float) -> str:
        """What the model actors wait for, from the cluster's free and total resources."""
        try:
            free, total = ray.available_resources(), ray.cluster_resources()
        except Exception as exc:  # the line must not fail: say what is known
            free, total = {}, {}
            note = f" (resources unreadable: {type(exc).__name__})"
        else:
            note = ""
        return pending_line(self.execution, free, total, self.address, waited) + note

    def _timeout(self, waited: float) -> None:
        ex = self.execution
        self.failure = StartupTimeout(
            f"no model actor started within execution.startup_timeout_s={ex.startup_timeout_s:g}"
            f": {self.waiting_line(waited)}"
        )
        _interrupt(self._target)

    def _gone(self, unreachable_s: float) -> None:
        self.on_gone(
            ClusterGone(
                f"the Ray cluster at {self.address} went away mid-run (its GCS refused "
                f"connections for {unreachable_s:.0f} s); committed rows are kept, the rest are "
                "left for a rerun"
            ),
            self.snapshot,
        )

    def _say(self, line: str) -> None:
        print(line, file=self.out or sys.stderr, flush=True)


def pending_line(
    ex: ExecutionSpec, free: dict[str, float], total: dict[str, float], address: str, waited: float
) -> str:
    """``waiting for N model actor(s): <what is short>`` (one line)."""
    n = ex.actors if isinstance(ex.actors, int) else ex.actors[0]
    needs = {"GPU": ex.gpus_per_actor, "CPU": ex.cpus_per_actor}
    needs = {k: v for k, v in needs.items() if v > 0}
    each = ", ".join(f"{_num(v)} {k}" for k, v in needs.items()) or "no resources"
    counts = {k: f"{_num(free.get(k, 0.0))} of {_num(total.get(k, 0.0))} {k} free" for k in needs}
    short = [counts[k] for k, v in needs.items() if free.get(k, 0.0) < v]
    rest = [counts[k] for k, v in needs.items() if free.get(k, 0.0) >= v]
    head = ", ".join(short) if short else "the resources look free, Ray has not placed it yet"
    detail = "; ".join([f"needs {each} each", *rest])
    return (
        f"waiting for {n} model actor{'s' if n != 1 else ''}: {head} ({detail}) on the Ray "
        f"cluster at {address}, {waited:.0f} s so far (gives up after "
        f"execution.startup_timeout_s={ex.startup_timeout_s:g})"
    )


def _num(value: float) -> str:
    return f"{value:g}"


class _Ask:
    """A ledger question asked without blocking: each poll takes the answer if it came, and
    asks again (a busy driver or a restarting GCS only delays it)."""

    def __init__(self, method: Any):
        self.method, self.ref = method, None

    def answer(self, default: Any) -> Any:
        try:
            if self.ref is None:
                self.ref = self.method.remote()
            ready, _ = ray.wait([self.ref], timeout=0)
            if not ready:
                return default
            ref, self.ref = self.ref, None
            return ray.get(ref)
        except Exception:
            self.ref = None
            return default


def _gcs_address() -> str:
    try:
        return str(ray.get_runtime_context().gcs_address)
    except Exception:
        return "?"


def _reachable(address: str) -> bool:
    """Whether the GCS accepts a TCP connection (an unknown address counts as reachable)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return True
    try:
        with socket.create_connection((host, int(port)), timeout=POLL_S):
            return True
    except OSError:
        return False


def _interrupt(thread: threading.Thread) -> None:
    """Raise KeyboardInterrupt in ``thread`` (the execution's): Ray Data stops on it."""
    if thread is threading.main_thread():
        _thread.interrupt_main()
        return
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread.ident or 0), ctypes.py_object(KeyboardInterrupt)
    )
