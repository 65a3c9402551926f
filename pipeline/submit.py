"""`python -m pipeline submit JOB.yaml [--address A] [--no-wait]`: submit through the Jobs SDK.

The submission id is deterministic (``<name>-<run_date>``): a second submit of the same
job and date is reported, not duplicated. ``runtime_env`` comes from the spec (working
directory ``.``, with the venv, outputs and caches excluded). The equivalent ``ray job
submit`` line is printed, so plain Ray tooling stays an option. Credentials are never put
in ``env_vars`` (Ray stores them in plaintext); the cluster gets them from its own identity.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from typing import Any

from pipeline.cli_run import add_common
from pipeline.spec import JobSpec, SpecError, load_spec
from pipeline.storage import redact

EXCLUDES = [
    ".venv",
    ".git",
    "demo-output",
    "bench/out",
    "**/__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The common arguments plus --address and --no-wait."""
    add_common(parser)
    parser.add_argument(
        "--address", default=None, help="Ray dashboard address (default: $RAY_ADDRESS)"
    )
    parser.add_argument("--no-wait", action="store_true", help="return after submitting")


def runtime_env(spec: JobSpec) -> dict[str, Any]:
    """The spec's runtime_env with defaults for working_dir and excludes."""
    env = spec.runtime_env.model_dump(exclude_none=True)
    env.setdefault("working_dir", ".")
    env["excludes"] = sorted(set(EXCLUDES) | set(env.get("excludes", [])))
    if not env.get("env_vars"):
        env.pop("env_vars", None)
    return env


def entrypoint(args: argparse.Namespace, run_date: str) -> str:
    """`python -m pipeline run SPEC --run-date D [--set ...]`, shell-quoted."""
    spec = os.path.relpath(args.spec)
    if spec.startswith(".."):  # outside the working dir: only reachable on this machine
        spec = os.path.abspath(args.spec)
    parts = ["python", "-m", "pipeline", "run", spec, "--run-date", run_date]
    for item in args.overrides:
        parts += ["--set", item]
    return shlex.join(parts)


def cli_line(address: str, sid: str, entry: str) -> str:
    """The equivalent `ray job submit` command line."""
    excl = ",".join(f'"{e}"' for e in EXCLUDES)
    return (
        f"ray job submit --address {address} --working-dir . --submission-id {sid} "
        f"--runtime-env-json '{{\"excludes\": [{excl}]}}' -- {entry}"
    )


def _submit(client: Any, *, wait_s: float = 90.0, **kwargs: Any) -> None:
    """Submit, retrying while a fresh cluster's job agent is not up yet."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.submit_job(**kwargs)
            return
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def main(args: argparse.Namespace) -> int:
    """Submit (once per name and run date), print the CLI line, optionally follow to the end."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        spec, run_date = load_spec(args.spec, run_date=args.run_date, overrides=args.overrides)
    except SpecError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    address = args.address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    sid, entry = f"{spec.name}-{run_date}", entrypoint(args, run_date)
    print(f"equivalent: {cli_line(address, sid, entry)}")
    client = JobSubmissionClient(address)
    try:
        status = client.get_job_status(sid)
        print(f"already submitted: {sid} is {status.value}; not submitting again")
    except RuntimeError:
        _submit(
            client,
            entrypoint=entry,
            submission_id=sid,
            runtime_env=runtime_env(spec),
            metadata={"job": spec.name, "run_date": run_date},
        )
        print(f"submitted: {sid}")
    if args.no_wait:
        return 0
    while (status := client.get_job_status(sid)) not in {
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.STOPPED,
    }:
        time.sleep(2)
    print(redact(client.get_job_logs(sid))[-4000:])
    print(f"{sid}: {status.value}")
    return 0 if status == JobStatus.SUCCEEDED else 1
