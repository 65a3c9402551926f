"""Helpers for the slow tests that start a real `ray start` cluster of their own.

Each cluster runs in a session of its own, on free loopback ports only (the dashboard agent's
fixed 52365 included), and is stopped by killing that session's processes: Ray's agents
rename themselves (`ray::DashboardAgent`), so their command lines do not name the temp dir, and
one left behind keeps its port, so the next cluster's agent cannot serve jobs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.s3server import free_port


@dataclass(frozen=True)
class LocalCluster:
    """A `ray start --head` of a test's own: its GCS port, dashboard port and process group."""

    temp_dir: str
    gcs_port: int
    dashboard_port: int
    pgid: int

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def kill(self) -> None:
        """SIGKILL every process of this cluster (never `ray stop`, which stops them all)."""
        for pid in _cluster_pids(self.pgid, self.temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                continue


def start_cluster(*, cpus: int, env: dict[str, str], dashboard: bool = True) -> LocalCluster:
    """`ray start --head` on loopback with its own temp dir and free ports for every server."""
    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    gcs, dash = free_port(), free_port()
    ports = {
        "--port": gcs,
        "--dashboard-port": dash,
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(),
        "--ray-client-server-port": free_port(),
    }
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={cpus}",
        "--num-gpus=0",
        "--dashboard-host=127.0.0.1",
        f"--include-dashboard={str(dashboard).lower()}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        *(f"{flag}={port}" for flag, port in ports.items()),
    ]
    starter = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    cluster = LocalCluster(temp_dir, gcs, dash, pgid=starter.pid)
    try:
        output, _ = starter.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        cluster.kill()
        raise
    if starter.returncode != 0:
        cluster.kill()
        raise RuntimeError(f"ray start failed:\n{output.decode(errors='replace')[-3000:]}")
    return cluster


def _cluster_pids(pgid: int, temp_dir: str) -> set[int]:
    """Processes in the cluster's group, or naming its temp dir, and all their descendants."""
    parents: dict[int, int] = {}
    ours: set[int] = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        pid = int(entry)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, pgrp, ...
        parents[pid] = int(fields[1])
        if int(fields[2]) == pgid or temp_dir.encode() in cmdline:
            ours.add(pid)
    grew = True
    while grew:
        children = {pid for pid, ppid in parents.items() if ppid in ours} - ours
        ours |= children
        grew = bool(children)
    ours.discard(os.getpid())
    return ours
