"""What the cluster shows about a run that does not move: live nodes, free resources, actors
waiting to be placed, and what the model stage needs (one line for the watchdog).

Read from Ray itself: ``ray.nodes()`` (only nodes ``Alive`` count; their resources from
`pipeline.stages.capacity`, which also drops nodes whose raylet no longer answers),
``ray.available_resources()`` and the actor table of this job (``ray.util.state`` needs the
dashboard, which a local run does not start, so the GCS's own table is read). Every reader
here may fail on a cluster in trouble; the callers catch and say so. Non-goal: Ray Data's
operator internals.
"""

from __future__ import annotations

from collections import Counter

import ray

from pipeline.spec import ExecutionSpec
from pipeline.stages.capacity import live_resources

WAITING = ("PENDING_CREATION", "DEPENDENCIES_UNREADY", "RESTARTING")


def live_nodes() -> dict[str, str]:
    """Live node id -> ``<ip> (node <id8>, <resources>)``."""
    out = {}
    for node in ray.nodes():
        if node.get("Alive"):
            res = node.get("Resources", {})
            held = ", ".join(f"{res[k]:g} {k}" for k in ("GPU", "CPU") if res.get(k))
            out[node["NodeID"]] = (
                f"{node.get('NodeManagerAddress', '?')} (node {node['NodeID'][:8]}, "
                f"{held or 'no CPU or GPU'})"
            )
    return out


def needs(ex: ExecutionSpec) -> str:
    """What one model actor reserves, e.g. ``1 GPU, 1 CPU``."""
    parts = [f"{v:g} {k}" for k, v in (("GPU", ex.gpus_per_actor), ("CPU", ex.cpus_per_actor))]
    return ", ".join(p for p in parts if not p.startswith("0 ")) or "no reserved resources"


def layout_problem(ex: ExecutionSpec, totals: dict[str, float]) -> str | None:
    """One line when the live nodes cannot hold the layout's smallest shape, else None."""
    actors = ex.actors if isinstance(ex.actors, int) else ex.actors[0]
    cpus = actors * ex.cpus_per_actor + 2  # one preprocessing actor, one read/write task
    gpus = actors * ex.gpus_per_actor
    have_c, have_g = totals.get("CPU", 0.0), totals.get("GPU", 0.0)
    if have_c >= cpus and have_g >= gpus:
        return None
    return (
        f"the live nodes have {have_c:g} CPU, {have_g:g} GPU; this run's layout needs "
        f"{cpus:g} CPU, {gpus:g} GPU ({actors} model actor(s) of {needs(ex)}, one "
        "preprocessing actor, one read/write task): it waits until capacity returns"
    )


def job_actors() -> Counter:
    """This job's actors by state (the GCS's table; the dashboard may not run)."""
    from ray._private import state

    job = ray.get_runtime_context().get_job_id()
    return Counter(
        a.get("State", "?")
        for a in state.actors().values()
        if a.get("JobID") in (None, job) and a.get("State") != "DEAD"
    )


def blocked_line(ex: ExecutionSpec, address: str, waited: float, in_flight: int = 0) -> str:
    """Which stage waits for which resource, what is free, on how many live nodes;
    ``in_flight``: items in model batches that have not returned (the ledger's count)."""
    try:
        free, totals, nodes = ray.available_resources(), live_resources(), live_nodes()
        actors = job_actors()
    except Exception as exc:
        return f"the cluster at {address} cannot be read ({type(exc).__name__}), {waited:.0f} s"
    parts = []
    if in_flight:
        parts.append(
            f"the model stage holds {in_flight} item(s) in batches that have not returned "
            "(a model call that hangs, or an actor lost with its node)"
        )
    waiting = {s.lower(): actors[s] for s in WAITING if actors[s]}
    if waiting:
        states = ", ".join(f"{n} {s}" for s, n in waiting.items())
        parts.append(f"actors of this job wait to be placed or restarted ({states})")
    short = [
        f"{free.get(k, 0.0):g} of {totals.get(k, 0.0):g} {k} free"
        for k, v in (("GPU", ex.gpus_per_actor), ("CPU", ex.cpus_per_actor))
        if v > 0 and free.get(k, 0.0) < v
    ]
    if short:
        parts.append(f"the model stage needs {needs(ex)} per actor: {', '.join(short)}")
    if free.get("CPU", 0.0) < 1:
        parts.append(
            f"no CPU free for reading, preprocessing or committing ({totals.get('CPU', 0.0):g} "
            f"CPU held by {actors['ALIVE']} live actor(s) and tasks)"
        )
    if not parts:
        parts.append(
            f"resources look free ({free.get('CPU', 0.0):g} CPU, {free.get('GPU', 0.0):g} GPU):"
            " the stages may wait on their input (reading, preprocessing)"
        )
    layout = layout_problem(ex, totals)
    if layout:
        parts.append(layout)
    return (
        f"{'; '.join(parts)} on {len(nodes)} live node(s) of the Ray cluster at {address}, "
        f"{waited:.0f} s"
    )
