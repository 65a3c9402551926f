"""The driver's watch over its Ray cluster while a run executes: actors that cannot start,
nodes lost and joined, a run that stops moving, a cluster that goes away.

A thread beside the execution, polling every `POLL_S`:

* **Startup.** Until the first model actor is placed (its constructor has begun: the run's
  `Ledger` hears of it before the weights load), it prints one line a minute naming what the
  actors wait for, e.g. ``waiting for 1 model actor: 0 of 1 GPU free (needs 1 GPU, 1 CPU
  each; 3 of 4 CPU free) on the Ray cluster at 10.0.0.5:6379, 60 s so far``. After
  ``execution.startup_timeout_s`` it fails the run with that line: the execution is
  interrupted in its own thread (Ray Data then stops its operators and actors) and the
  caller gets `StartupTimeout`.
* **Nodes.** Every `NODES_S` it compares the live nodes (``ray.nodes()``, ``Alive``) with the
  last look: a node lost or joined is one line, and the layout is checked again against the
  live CPUs. A lost node's model actor restarts on a surviving or replacement node (Ray Data's
  pools restart without bound) and its batches are answered again. When nothing has moved
  since the loss for ``execution.startup_timeout_s`` (no capacity came back), the run fails
  with `NodeLost`: one line naming the node and what to do.
* **Stalls.** The ledger counts progress (model actors placed or loaded, batches begun or
  ended). Once nothing has moved for a few minutes (a third of ``execution.stall_timeout_s``
  at most) it prints one line a minute naming what is blocked (which actors wait, for which
  resources, what is free on which live nodes), and after ``execution.stall_timeout_s`` the
  run fails with `StallTimeout` and that line.
* **The cluster going away.** When the cluster's GCS refuses connections for `GONE_AFTER_S`
  (a GCS restart under fault tolerance takes less), ``on_gone`` is called with `ClusterGone`
  from this thread. The execution cannot be stopped cleanly then (its calls into Ray block,
  and Ray's core ends the process about 60 s after losing the GCS), so ``on_gone`` must do
  what is left from storage alone and end the process (`pipeline.job.runner` writes the run
  summary, releases the lease, prints its lines and exits 1).

Non-goals: changing the layout of a running execution (Ray Data fixes it at the start; the
line says what to change for the rerun).
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

import ray

from pipeline.job import blocked
from pipeline.spec import ExecutionSpec
from pipeline.stages.capacity import address_accepts, live_resources

POLL_S = 2.0
WAIT_LINE_S = 60.0  # one "waiting for" / "blocked" line per this many seconds
STALL_NOTICE_S = 180.0  # nothing moved this long (or a third of the stall timeout): say why
NODES_S = 5.0  # how often the live nodes are compared
GONE_AFTER_S = 15.0  # GCS unreachable this long: the cluster is gone (Ray's core gives 60 s)
SNAPSHOT_S = 10.0  # refresh of the actors' record kept for a summary without the cluster


class StartupTimeout(RuntimeError):
    """No model actor could start within ``execution.startup_timeout_s``."""


class NodeLost(RuntimeError):
    """A node was lost and no capacity came back within ``execution.startup_timeout_s``."""


class StallTimeout(RuntimeError):
    """Nothing moved for ``execution.stall_timeout_s``."""


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
        self.failure: RuntimeError | None = None
        self.address = _gcs_address()
        self.snapshot: dict[str, Any] = {}  # the ledger's actors, refreshed every SNAPSHOT_S
        self.nodes = blocked.live_nodes()
        self.lost: tuple[str, float] | None = None  # a lost node and when, until a move after it
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
            if address_accepts(self.address, POLL_S):
                return
            time.sleep(POLL_S / 2)

    def _watch(self) -> None:
        snapshot = _Ask(self.ledger.snapshot)
        startup = _Startup(self)
        moving = _Moving(self)
        gone_since: float | None = None
        next_snapshot = 0.0
        while not self._stop.wait(POLL_S):
            now = time.monotonic()
            if not address_accepts(self.address, POLL_S):
                gone_since = gone_since if gone_since is not None else now
                if now - gone_since >= GONE_AFTER_S:
                    self._gone(now - gone_since)
                    return
                continue
            gone_since = None
            if now >= next_snapshot:
                self.snapshot = snapshot.answer(self.snapshot)
                next_snapshot = now + SNAPSHOT_S
            if not startup.placed:
                moving.watch_nodes(now)  # a node lost before the ledger says "placed" too
                if not startup.check(now, moving):
                    return
                moving.restart(now)
                continue
            if not moving.check(now):
                return

    def waiting_line(self, waited: float) -> str:
        """What the model actors wait for, from the cluster's free and total resources."""
        try:
            free, total = ray.available_resources(), live_resources()
        except Exception as exc:  # the line must not fail: say what is known
            free, total = {}, {}
            note = f" (resources unreadable: {type(exc).__name__})"
        else:
            note = ""
        return pending_line(self.execution, free, total, self.address, waited) + note

    def fail(self, failure: RuntimeError) -> None:
        """End the run with ``failure``: the execution is interrupted in its thread."""
        self.failure = failure
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

    def say(self, line: str) -> None:
        print(line, file=self.out or sys.stderr, flush=True)


class _Startup:
    """Until the first model actor is placed: a waiting line a minute, then StartupTimeout."""

    def __init__(self, watch: Watchdog):
        self.watch, self.placed = watch, False
        self.count = _Ask(watch.ledger.placed)
        self.next_line = WAIT_LINE_S

    def check(self, now: float, moving: _Moving) -> bool:
        """False once the run was failed (`NodeLost` when a node was lost meanwhile)."""
        w = self.watch
        waited = now - w._started
        self.placed = self.count.answer(0) > 0
        if self.placed:
            return True
        timeout = w.execution.startup_timeout_s
        if waited >= timeout:
            try:  # a late answer must not fail a run whose actor did start
                self.placed = ray.get(w.ledger.placed.remote(), timeout=30) > 0
            except Exception:
                self.placed = False
            if self.placed:
                return True
            if w.lost is not None:
                w.fail(NodeLost(moving.lost_line(time.monotonic() - w.lost[1])))
                return False
            ex = w.execution
            w.fail(
                StartupTimeout(
                    "no model actor started within "
                    f"execution.startup_timeout_s={ex.startup_timeout_s:g}: "
                    f"{w.waiting_line(time.monotonic() - w._started)}"
                )
            )
            return False
        if waited >= self.next_line:
            w.say(f"run: {w.waiting_line(waited)}")
            self.next_line += WAIT_LINE_S
        return True


class _Moving:
    """After start-up: nodes lost and joined, and the stall clock on the ledger's progress."""

    def __init__(self, watch: Watchdog):
        self.watch = watch
        self.progress = _Ask(watch.ledger.progress)
        self.moves: int | None = None
        self.at_loss: int | None = None  # the ledger's move count first read after the loss
        self.in_flight = self.loaded = 0  # items in batches not returned; actors loaded
        self.moved = self.next_nodes = self.next_line = 0.0

    def restart(self, now: float) -> None:
        self.moved, self.next_line = now, now + self.notice_after()

    def notice_after(self) -> float:
        return min(STALL_NOTICE_S, self.watch.execution.stall_timeout_s / 3)

    def check(self, now: float) -> bool:
        """False once the run was failed."""
        w, ex = self.watch, self.watch.execution
        self.watch_nodes(now)
        answer = self.progress.answer(None)
        if answer is not None:
            moves, self.in_flight, self.loaded = answer
            if moves != self.moves:
                self.moves = moves
                self.restart(now)
            self._after_loss(moves)
        if w.lost is not None:  # nothing has moved since the loss
            since = now - w.lost[1]
            if since >= ex.startup_timeout_s:
                w.fail(NodeLost(self.lost_line(since)))
                return False
            if now >= self.next_line:
                w.say(f"run: waiting for capacity: {self._blocked(since)}")
                self.next_line = now + WAIT_LINE_S
            return True
        idle = now - self.moved
        if idle >= ex.stall_timeout_s:
            w.fail(
                StallTimeout(
                    f"{self._stalled(idle)} (execution.stall_timeout_s={ex.stall_timeout_s:g})"
                )
            )
            return False
        if now >= self.next_line:
            w.say(f"run: {self._stalled(idle)}")
            self.next_line = now + min(WAIT_LINE_S, self.notice_after())
        return True

    def _after_loss(self, moves: int) -> None:
        """A loss is over once the ledger counts a move after it. Only answers to questions
        asked after the loss count: one already on its way may hold moves from before it."""
        w = self.watch
        if w.lost is None or self.progress.asked < w.lost[1]:
            return
        if self.at_loss is None:
            self.at_loss = moves
        elif moves > self.at_loss:
            w.lost, self.at_loss = None, None

    def watch_nodes(self, now: float) -> None:
        """Compare the live nodes every `NODES_S`: one line per node lost or joined."""
        if now >= self.next_nodes:
            self.next_nodes = now + NODES_S
            self._nodes(now)

    def _nodes(self, now: float) -> None:
        w = self.watch
        try:
            nodes = blocked.live_nodes()
        except Exception:
            return
        lost = [w.nodes[n] for n in w.nodes.keys() - nodes.keys()]
        joined = [nodes[n] for n in nodes.keys() - w.nodes.keys()]
        w.nodes = nodes
        for node in lost:
            w.lost, self.at_loss = (node, now), None
            self.next_line = min(self.next_line, now + WAIT_LINE_S)
            w.say(
                f"run: lost node {node} mid-run; its model actors restart on surviving or "
                "replacement nodes and its batches are answered again (waiting up to "
                f"execution.startup_timeout_s={w.execution.startup_timeout_s:g} for capacity)"
            )
        for node in joined:
            w.say(f"run: node {node} joined")
        if lost or joined:
            short = blocked.layout_problem(w.execution, live_resources())
            if short:
                w.say(f"run: {short}")

    def _blocked(self, waited: float) -> str:
        w = self.watch
        return blocked.blocked_line(w.execution, w.address, waited, self.in_flight)

    def _stalled(self, idle: float) -> str:
        loading = "" if self.loaded else "no model actor has loaded its model yet; "
        return f"stalled: no model batch has begun or ended for {idle:.0f} s: {loading}" + (
            self._blocked(idle)
        )

    def lost_line(self, since: float) -> str:
        w, ex = self.watch, self.watch.execution
        node = w.lost[0] if w.lost else "?"
        return (
            f"lost node {node} and no capacity came back within "
            f"execution.startup_timeout_s={ex.startup_timeout_s:g}: "
            f"{self._blocked(since)}; committed rows are kept: rerun the "
            f"same command once the cluster has {blocked.needs(ex)} free for a model actor "
            "(a replacement node)"
        )


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
        self.sent = self.asked = 0.0  # when the pending question / the last answered one was asked

    def answer(self, default: Any) -> Any:
        try:
            if self.ref is None:
                self.ref, self.sent = self.method.remote(), time.monotonic()
            ready, _ = ray.wait([self.ref], timeout=0)
            if not ready:
                return default
            ref, self.ref, self.asked = self.ref, None, self.sent
            return ray.get(ref)
        except Exception:
            self.ref = None
            return default


def _gcs_address() -> str:
    try:
        return str(ray.get_runtime_context().gcs_address)
    except Exception:
        return "?"


def _interrupt(thread: threading.Thread) -> None:
    """Raise KeyboardInterrupt in ``thread`` (the execution's): Ray Data stops on it.

    An asynchronous exception, delivered at the thread's next bytecode (Ray Data's wait loops
    sleep 10 ms), for the main thread too: ``_thread.interrupt_main`` only runs the SIGINT
    handler, and a run started in the background by a non-interactive shell (``&``, nohup, a
    scheduler's script) has SIGINT ignored, so it did nothing and the run hung."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread.ident or 0), ctypes.py_object(KeyboardInterrupt)
    )
