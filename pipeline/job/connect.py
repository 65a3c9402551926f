"""Which Ray cluster a run uses: the one ``RAY_ADDRESS`` names, one a `ray start` left on
this machine, or a private local one this process starts.

An address is tried before Ray is handed it: Ray's own connect retries an address that does
not answer for minutes, a line a few seconds, while a cluster file that `ray start` left
behind (its cluster since stopped) is common on shared machines. So a named address that does
not accept a connection within `CONNECT_S` is refused in one line (`ClusterUnreachable`, a
whole-job problem: nothing is loaded or written), a cluster that wants a token this process
does not have (Ray's token auth) is refused in one line too (`ClusterRefused`) instead of
Ray's 20 s of retries, and a stale left-behind address is passed over for a private cluster,
said in one line. Non-goal: waiting for a cluster that is still
starting (the scheduler starts the run once its cluster is up).
"""

from __future__ import annotations

import os
import sys
import threading
import time

import ray

from pipeline.spec import JobSpec
from pipeline.stages.capacity import address_accepts

CONNECT_S = 10.0  # how long an address may take to accept a TCP connection
RETRY_S = 1.0
TOKEN_CHECK_S = 5.0  # how long the GCS may take to accept or refuse this process's token


class ClusterUnreachable(RuntimeError):
    """The Ray cluster ``RAY_ADDRESS`` names does not answer."""


class ClusterRefused(ClusterUnreachable):
    """The Ray cluster answers but wants a token this process does not have."""


def ensure_ray(spec: JobSpec) -> bool:
    """Connect to the current cluster (RAY_ADDRESS or a local `ray start`), else start one.

    ``RAY_ADDRESS=local`` always starts a private local cluster. Joining a `ray start` cluster
    found on this machine (``RAY_ADDRESS`` unset) is said in one line, since its resources
    may be taken. Returns True when this call started a local cluster (the caller shuts it
    down).
    """
    if ray.is_initialized():
        return False
    address = cluster_address(os.environ.get("RAY_ADDRESS", ""))
    if address is not None:
        ray.init(address=address, log_to_driver=True)
        if not os.environ.get("RAY_ADDRESS"):
            _say(
                f"run: joined the Ray cluster at {address} that `ray start` left on this "
                "machine (RAY_ADDRESS=local starts a private one instead)"
            )
        return False
    _start_local(spec)
    return True


def cluster_address(named: str) -> str | None:
    """The address to join (checked to answer), or None to start a private cluster.

    Raises `ClusterUnreachable` when ``named`` (``RAY_ADDRESS``: ``host:port``,
    ``ray://host:port`` or ``auto``) does not answer or finds no cluster.
    """
    if named == "local":
        return None
    if named.startswith("ray://"):
        _check(named, named.removeprefix("ray://"))
        return named
    found = _bootstrap_address(named)
    if found is None:
        return None
    if named:
        _check(named, found)
        _check_token(found)
        return found
    if _answers(found, CONNECT_S / 2):
        _check_token(found)
        return found
    _say(
        f"run: the Ray cluster at {found} that `ray start` left on this machine does not "
        "answer (stopped since); starting a private local one (RAY_ADDRESS=local skips this "
        "check)"
    )
    return None


def _bootstrap_address(named: str) -> str | None:
    """``named`` as written, or for ``auto``/unset the cluster Ray itself would find (the
    address file `ray start` writes); None when unset and there is none."""
    from ray._private import services

    if named and named != "auto":
        return named
    try:
        return services.get_ray_address_from_environment(named or None, None)
    except ConnectionError as exc:  # "auto" and no cluster on this machine
        raise ClusterUnreachable(f"RAY_ADDRESS={named}: {exc}") from None


def _check(named: str, host_port: str) -> None:
    if not _answers(host_port, CONNECT_S):
        raise ClusterUnreachable(
            f"RAY_ADDRESS={named}: no Ray cluster answers at {host_port} (no connection "
            f"within {CONNECT_S:g} s); start the cluster, correct RAY_ADDRESS, or set "
            "RAY_ADDRESS=local for a private one"
        )


def _check_token(host_port: str) -> None:
    """Ask the cluster's GCS for its id (what `ray start --address` does first): a cluster
    with token auth refuses at once when this process has no token or a wrong one, and
    ``RAY_AUTH_MODE=token`` without any token is refused before Ray's core aborts on it. An
    address that answers but is no GCS (a dashboard port) is left to Ray's own connect after
    `TOKEN_CHECK_S`."""
    refused: list[bool] = []
    asking = threading.Thread(target=_ask_gcs, args=(host_port, refused), daemon=True)
    asking.start()
    asking.join(TOKEN_CHECK_S)
    if refused:
        raise ClusterRefused(token_hint(host_port, then="run again"))


def _ask_gcs(host_port: str, refused: list[bool]) -> None:
    from ray.exceptions import AuthenticationError

    try:
        from ray._raylet import AuthenticationTokenLoader, GcsClient
    except ImportError:  # Ray's internals moved: its own connect will say what is wrong
        return
    try:
        AuthenticationTokenLoader.instance().has_token()
        GcsClient(address=host_port)
    except AuthenticationError:
        refused.append(True)
    except Exception:  # anything else: Ray's own connect says what is wrong
        return


def token_hint(address: str, *, then: str) -> str:
    """The one line for a cluster that wants a token (Ray's token auth) and got none."""
    return (
        f"the Ray cluster at {address} requires token authentication: set RAY_AUTH_MODE=token "
        "and RAY_AUTH_TOKEN to its token (or RAY_AUTH_TOKEN_PATH to a file holding it; `ray "
        f"get-auth-token` on the head prints it) and {then}"
    )


def _answers(host_port: str, within: float) -> bool:
    """Whether ``host:port`` accepts a TCP connection within ``within`` seconds."""
    deadline = time.monotonic() + within
    while not address_accepts(host_port, RETRY_S):
        if time.monotonic() + RETRY_S >= deadline:
            return False
        time.sleep(RETRY_S)
    return True


def _start_local(spec: JobSpec) -> None:
    import torch

    gpus = torch.cuda.device_count()
    if spec.execution.gpus_per_actor > gpus:
        raise RuntimeError(
            f"execution.gpus_per_actor={spec.execution.gpus_per_actor} but this machine has "
            f"{gpus} GPU(s); set --set execution.gpus_per_actor=0 to run the model on CPU"
        )
    cpus = max(4, os.cpu_count() or 1)  # at least 4 slots: reading, CPU and model stages overlap
    # worker start-up may use the slots we declare (Ray's default is the physical core count,
    # and it warns on every run of a small machine otherwise)
    ray.init(
        num_cpus=cpus,
        num_gpus=gpus,
        include_dashboard=False,
        _system_config={"worker_maximum_startup_concurrency": cpus},
    )


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
