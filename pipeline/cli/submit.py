"""`python -m pipeline submit JOB.yaml [--address A] [--no-wait]`: submit through the Jobs SDK.

The submission id is deterministic (``<name>-<run_date>``): a second submit of the same
job and date is reported, not duplicated, while that job is pending, running or succeeded;
a retry of a FAILED (or STOPPED) night gets the next attempt id (``<name>-<run_date>-2``,
``-3``, ...), so its logs are its own. Before submitting, the spec's local relative paths
that the job's working dir will not hold (excluded, or ignored by ``.gitignore`` /
``.rayignore`` as Ray's upload does) are named in a warning. A cluster that wants a token
and got none is one line saying what to set. ``runtime_env`` comes from the spec (working
directory ``.``, with the venv, outputs and caches excluded). The equivalent ``ray job
submit`` line is printed, so plain Ray tooling stays an option. Credentials are never put
in ``env_vars`` (Ray stores them in plaintext); the cluster gets them from its own identity.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.cli.run import add_common
from pipeline.io.storage import redact
from pipeline.spec import JobSpec, SpecError, load_spec

_QUIET = logging.getLogger("pipeline.cli.submit.ignore_files")
_QUIET.setLevel(logging.WARNING)  # Ray's helper logs every ignore file it reads at INFO
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


def local_path_warnings(spec: JobSpec, env: dict[str, Any]) -> list[str]:
    """One line per spec path that is local and relative but will not exist in the job's
    working dir (missing here, or left out of the upload by excludes / ignore files)."""
    root = Path(env.get("working_dir", ".")).resolve()
    if not root.is_dir():
        return []
    out = []
    for key, path in _relative_paths(spec):
        if key == "output.uri":
            why = "results would land in its temporary copy of the working dir"
        else:
            why = _not_shipped(root, Path(path), env.get("excludes", []))
        if why:
            out.append(
                f"warning: {key} {path!r} is relative to the job's working dir, which will not "
                f"have it ({why}); use an absolute path the cluster can read or an s3:// URI"
            )
    return out


def _relative_paths(spec: JobSpec) -> list[tuple[str, str]]:
    paths = [("input.uri", spec.input.uri), ("output.uri", spec.output.uri)]
    if spec.input.image_root:
        paths.append(("input.image_root", spec.input.image_root))
    model = spec.model.path  # a hub id is org/name; anything else path-like is a path
    if model.startswith(".") or model.endswith("/") or model.count("/") > 1 or Path(model).exists():
        paths.append(("model.path", model))
    return [(k, p) for k, p in paths if "://" not in p and not os.path.isabs(os.path.expanduser(p))]


def _not_shipped(root: Path, path: Path, excludes: list[str]) -> str | None:
    """Why Ray's working_dir upload will not hold ``path`` (relative to the cwd), or None."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import _get_excludes, get_excludes_from_ignore_files

    target = path.resolve()
    if not target.is_relative_to(root):
        return f"outside {root}"
    if not target.exists():
        return "it does not exist here"
    patterns = ray_constants.get_runtime_env_default_excludes() + list(excludes)
    excluded = _get_excludes(root, patterns)
    gitignore = os.environ.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    node, checks = root, []
    for part in target.relative_to(root).parts:
        checks += get_excludes_from_ignore_files(node, include_gitignore=gitignore, logger=_QUIET)
        node = node / part
        if excluded(node):
            return f"{node.relative_to(root)} is in runtime_env excludes"
        if any(check(node) for check in checks):
            return f"{node.relative_to(root)} is ignored by .gitignore/.rayignore"
    return None


def submission_id(client: Any, base: str) -> tuple[str, Any]:
    """The id to use: the newest attempt of ``base`` with its status when it is pending,
    running or succeeded (not submitted again), else the next attempt's id and None."""
    from ray.job_submission import JobStatus

    pattern = re.compile(rf"^{re.escape(base)}(?:-(\d+))?$")
    attempts: dict[int, Any] = {}
    for job in client.list_jobs():
        hit = pattern.match(job.submission_id or "")
        if hit:
            attempts[int(hit.group(1) or 1)] = job.status
    if not attempts:
        return base, None
    last = max(attempts)
    sid = base if last == 1 else f"{base}-{last}"
    if attempts[last] in (JobStatus.FAILED, JobStatus.STOPPED):
        return f"{base}-{last + 1}", None
    return sid, attempts[last]


class NoJobAgent(RuntimeError):
    """The cluster's dashboard accepted the job but no node's job agent ever took it."""


def _submit(client: Any, *, wait_s: float = 90.0, **kwargs: Any) -> None:
    """Submit, retrying while a fresh cluster's job agent is not up yet."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.submit_job(**kwargs)
            return
        except RuntimeError as exc:
            if "No available agent" not in str(exc):
                raise
            if time.monotonic() > deadline:
                raise NoJobAgent(no_agent_hint(wait_s)) from exc
            time.sleep(2)


def no_agent_hint(wait_s: float) -> str:
    """The one line for a cluster whose job agent never registered."""
    return (
        f"the Ray cluster has no job agent after {wait_s:.0f} s, so it cannot run jobs; on "
        "the head node, dashboard_agent.log (in the session's logs folder) says why: most "
        "often its HTTP port (ray start --dashboard-agent-listen-port, 52365 by default) is "
        "taken, e.g. by an agent left over from another Ray; free it or pick another port"
    )


def main(args: argparse.Namespace) -> int:
    """Submit (once per name and run date; a failed night's retry as a new attempt), print
    the CLI line, optionally follow to the end."""
    from ray.exceptions import AuthenticationError

    try:
        spec, run_date = load_spec(args.spec, run_date=args.run_date, overrides=args.overrides)
    except SpecError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    address = args.address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    env = runtime_env(spec)
    for line in local_path_warnings(spec, env):
        print(line, file=sys.stderr)
    try:
        return _submit_and_follow(args, spec, run_date, address, env)
    except AuthenticationError:
        from pipeline.job.connect import token_hint  # imports ray: not before a token is set

        print(f"error: {token_hint(address, then='submit again')}", file=sys.stderr)
        return 2
    except NoJobAgent as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _submit_and_follow(
    args: argparse.Namespace, spec: JobSpec, run_date: str, address: str, env: dict[str, Any]
) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    entry = entrypoint(args, run_date)
    client = JobSubmissionClient(address)
    sid, status = submission_id(client, f"{spec.name}-{run_date}")
    print(f"equivalent: {cli_line(address, sid, entry)}")
    if status is not None:
        print(f"already submitted: {sid} is {status.value}; not submitting again")
    else:
        _submit(
            client,
            entrypoint=entry,
            submission_id=sid,
            runtime_env=env,
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
