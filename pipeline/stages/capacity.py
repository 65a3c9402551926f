"""What the connected Ray cluster can hold now: the resources of its live nodes.

A node counts when the GCS lists it ``Alive`` and its raylet answers on its port. A node
killed seconds ago (a preempted spot GPU) stays ``Alive`` in the GCS until its health checks
fail, 15-30 s with Ray's defaults; a layout sized from it reserves CPUs that are gone, and a
rerun started right after the loss stalls (its read task never gets a CPU). The probe is one
TCP connect per node, in parallel, at most `PROBE_S` each. Non-goal: deciding that a node was
lost mid-run (the watchdog trusts the GCS for that: a busy raylet may answer slowly).
"""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray

PROBE_S = 1.0


def live_resources() -> dict[str, float]:
    """Total resources of the nodes alive now (in the GCS and answering); the GCS's view
    alone when no raylet answers (a network that hides them from the driver)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(nodes)))) as pool:
        answering = [n for n, ok in zip(nodes, pool.map(raylet_answers, nodes), strict=True) if ok]
    total: dict[str, float] = {}
    for node in answering or nodes:
        for key, value in node.get("Resources", {}).items():
            total[key] = total.get(key, 0.0) + value
    return total


def raylet_answers(node: dict[str, Any]) -> bool:
    """Whether the node's raylet accepts a connection (True when its address is not known)."""
    host, port = node.get("NodeManagerAddress"), node.get("NodeManagerPort")
    return not host or not port or accepts(host, int(port), PROBE_S)


def address_accepts(address: str, timeout: float) -> bool:
    """Whether ``host:port`` accepts a TCP connection within ``timeout`` seconds; True when
    ``address`` is no ``host:port`` (Ray's own connect says what is wrong with it)."""
    host, _, port = address.rpartition(":")
    return not host or not port.isdigit() or accepts(host, int(port), timeout)


def accepts(host: str, port: int, timeout: float) -> bool:
    """Whether ``host`` (a name, IPv4 or bracketed IPv6) accepts a TCP connection on ``port``."""
    try:
        with socket.create_connection((host.strip("[]"), port), timeout=timeout):
            return True
    except OSError:
        return False
