"""Drop known, acted-on advisories that Ray's C++ core writes to the driver's stderr.

Ray's core worker logs ``Actor ... has constructor arguments in the object store and
max_restarts > 0`` (ray-project/ray#53727) for every Ray Data actor pool whose actors may
restart: Ray Data always passes its own ``ray.put`` references (the data context and the map
transformer) as constructor arguments, and the model stage sets ``max_restarts`` to bound
retries. The references are held by the operator for the whole execution, so a restart finds
them: the line is a false alarm for us, printed in red on every run. A lost node's retry
notices and obituary are dropped too: the watchdog's ``run: lost node ...`` line says it once,
with what the run does. Ray's lines come from C++ or its log monitor, past
Python's logging, so `drop_lines` filters file descriptor 2 itself: a pipe and a thread that
forwards every other byte. Ray's log files keep the line. Partial lines (progress bars' ``\\r``
updates) are forwarded at once unless they look like the start of a Ray core log line.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator

RAY_ADVISORIES = (
    b"has constructor arguments in the object store and max_restarts > 0",
    # a lost node: the watchdog's one line names it and what the run does; Ray's retry
    # notices (one per task, "repeated Nx") and its three-line obituary say it again
    b"There are infinite retries remaining, so the task will be retried",
    b"has been marked dead because the detector has missed too many heartbeats",
    b"raylet has lagging heartbeats due to slow network or busy workload",
)
JOIN_S = 2.0


_ACTIVE: list[_Filter] = []


class _Filter:
    """fd 2 through a pipe and a pump thread; `stop` puts fd 2 back and drains the pipe."""

    def __init__(self, patterns: tuple[bytes, ...]) -> None:
        sys.stderr.flush()
        self.saved = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self.pump = threading.Thread(
            target=_pump, args=(read, self.saved, patterns), name="resprune-stderr", daemon=True
        )
        self.pump.start()
        self.stopped = False

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(self.saved, 2)  # the pipe's last writer goes: the pump reads EOF and ends
        self.pump.join(timeout=JOIN_S)
        if not self.pump.is_alive():  # else a child still holds the pipe: it keeps forwarding
            os.close(self.saved)


@contextlib.contextmanager
def drop_lines(patterns: tuple[bytes, ...] = RAY_ADVISORIES) -> Iterator[None]:
    """While the body runs, lines on fd 2 containing any of ``patterns`` are dropped."""
    try:
        active = _Filter(patterns)
    except OSError:  # no usable fd 2: nothing to filter
        yield
        return
    _ACTIVE.append(active)
    try:
        yield
    finally:
        _ACTIVE.remove(active)
        active.stop()


def restore() -> None:
    """Put fd 2 back now, every line before it forwarded (before ``os._exit``, which skips
    the context's exit)."""
    for active in reversed(_ACTIVE):
        active.stop()


def _pump(read: int, out: int, patterns: tuple[bytes, ...]) -> None:
    """Forward ``read`` to ``out`` line by line, without the lines matching ``patterns``."""
    pending = b""
    with contextlib.suppress(OSError):
        while chunk := os.read(read, 65536):
            *lines, pending = (pending + chunk).split(b"\n")
            kept = [line + b"\n" for line in lines if not any(p in line for p in patterns)]
            if pending and not pending.startswith(b"["):  # not a core log line: pass it on
                kept.append(pending)
                pending = b""
            if kept:
                os.write(out, b"".join(kept))
        if pending:
            os.write(out, pending)
    os.close(read)
