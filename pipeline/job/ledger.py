"""The run's bookkeeping actor: model actors (start, shape, busy and compile seconds), the
batches in flight and where they run, systemic exits, and a progress counter.

It is pinned to the driver's node (`start_ledger`), never to a GPU worker: the driver holds
the run anyway, so the ledger dies only with the run, while a worker node lost mid-run (a
preempted spot GPU) takes nothing the run needs with it. It outlives the model actors, so a
retried batch learns whether an earlier attempt killed its process, on a node still alive
(a poison suspect: answered one item at a time) or on a node the cluster lost (nobody's
fault: answered again whole), and which item was being answered alone when a process died
(poison quarantine). Non-goal: surviving the driver (a rerun resumes from storage).
"""

from __future__ import annotations

import time
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


def start_ledger(max_systemic: int) -> Any:
    """A `Ledger` on the driver's node (hard affinity, no CPU reserved)."""
    here = ray.get_runtime_context().get_node_id()
    pin = NodeAffinitySchedulingStrategy(node_id=here, soft=False)
    return Ledger.options(scheduling_strategy=pin).remote(max_systemic)


def alive_nodes() -> set[str]:
    """Ids of the nodes the cluster holds alive now."""
    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}


@ray.remote(num_cpus=0, max_restarts=0)
class Ledger:
    """Driver-side record of model actors and of batches in flight (see the module doc)."""

    def __init__(self, max_systemic: int = 2) -> None:
        self.max_systemic = max_systemic
        self.actors: dict[str, dict[str, Any]] = {}
        self.batch_starts: dict[str, str | None] = {}  # id -> node of a batch never ended
        self.solo_starts: dict[str, str | None] = {}  # id -> node of a solo never ended
        self.systemic: list[str] = []  # causes of actor exits on systemic faults
        self.placed_keys: set[str] = set()  # model actors whose constructor has begun
        self.moves = 0  # progress events: actors placed or loaded, batches begun or ended
        self.lost_batches = 0  # batches whose earlier attempt died with its node

    def begin_batch(self, ids: list[str], node: str | None = None) -> tuple[bool, list[str]]:
        """Start a model batch on ``node``: (did an earlier attempt die on a live node?, ids
        that died answered alone on a live node). Attempts on lost nodes blame nobody."""
        self.moves += 1
        earlier = {self.batch_starts[i] for i in ids if i in self.batch_starts}
        solo = {i: self.solo_starts[i] for i in ids if i in self.solo_starts}
        alive = alive_nodes() if earlier or solo else set()
        died = any(n is None or n in alive for n in earlier)
        if earlier and not died:
            self.lost_batches += 1
        for i in ids:
            self.batch_starts[i] = node
        return died, [i for i, n in solo.items() if n is None or n in alive]

    def begin_solo(self, item_id: str, node: str | None = None) -> None:
        self.solo_starts[item_id] = node

    def end_solo(self, item_id: str) -> None:
        self.moves += 1
        self.solo_starts.pop(item_id, None)

    def end(self, ids: list[str]) -> None:
        self.moves += 1
        for i in ids:
            self.batch_starts.pop(i, None)
            self.solo_starts.pop(i, None)

    def systemic_exit(self, ids: list[str], cause: str) -> str | None:
        """An actor hit a systemic fault: its batch is no poison suspect; keep the cause.
        Returns the run's failure line once more than ``max_systemic`` faults were hit (the
        actor then raises instead of exiting), else None (it exits and Ray restarts it)."""
        self.end(ids)
        self.systemic.append(cause)
        return self.systemic_cause() if len(self.systemic) > self.max_systemic else None

    def systemic_cause(self) -> str | None:
        """One line naming the systemic fault(s) of this run, or None."""
        if not self.systemic:
            return None
        return (
            f"systemic fault, the model actor hit it {len(self.systemic)} time(s) "
            f"(execution.max_task_retries={self.max_systemic} restarts) and the run could not "
            f"progress: {self.systemic[-1]}; unanswered rows are left for a rerun"
        )

    def actor_placed(self, key: str) -> None:
        """A model actor got its resources: its constructor has begun (before the weights)."""
        self.moves += 1
        self.placed_keys.add(key)

    def placed(self) -> int:
        return len(self.placed_keys)

    def progress(self) -> tuple[int, int, int]:
        """(progress events so far, items in model batches begun and not ended, model actors
        that loaded their model): the watchdog's stall clock restarts on each event."""
        return self.moves, len(self.batch_starts), len(self.actors)

    def actor_started(
        self, key: str, started: float, shape: dict[str, Any], actor_id: str | None = None
    ) -> None:
        """A model actor's process loaded its model (``actor_id``: its Ray actor, which a
        restart keeps, so the summary knows which process died)."""
        self.moves += 1
        self.actors[key] = {
            "started": started,
            "busy_s": 0.0,
            "compile_s": 0.0,
            "shape": shape,
            "actor_id": actor_id,
            "last": time.time(),
        }

    def actor_busy(self, key: str, busy_s: float, compile_s: float = 0.0) -> None:
        """The actor's model seconds and its compile and capture seconds so far."""
        actor = self.actors.setdefault(key, {"started": time.time(), "shape": None})
        actor.update(busy_s=busy_s, compile_s=compile_s, last=time.time())

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return self.actors
