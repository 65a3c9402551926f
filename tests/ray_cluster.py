"""Helpers for the slow tests that start a real `ray start` cluster of their own."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_cluster(temp_dir: str) -> None:
    """Stop only our cluster: processes whose command line names our temp dir, by pid."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if temp_dir.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(int(pid), signal.SIGKILL)
        except OSError:
            continue
