"""`python -m pipeline validate JOB.yaml [--deep]`: check a spec without running it.

Plain validation imports neither Ray nor torch: it parses the spec (unknown keys are
errors; every problem is listed with its key path). ``--deep`` also checks storage, input
columns, the model path, the output prefix's fingerprint and that the engine is installed
(still no Ray, no weights). It never writes: no probe, no lease, no recovery (a prefix is
left byte-identical).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from pipeline.cli_run import add_common
from pipeline.spec import SpecError, load_spec
from pipeline.storage import redact

if TYPE_CHECKING:
    from pipeline.plan import Plan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The spec, --run-date, --set, and --deep."""
    add_common(parser)
    parser.add_argument(
        "--deep", action="store_true", help="also check storage, columns, model path, engine"
    )


def main(args: argparse.Namespace) -> int:
    """Print `ok: ...` or every problem; exit 0 or 2."""
    try:
        spec, run_date = load_spec(args.spec, run_date=args.run_date, overrides=args.overrides)
        if args.deep:
            from pipeline.checks import ModelPathError, check_engine
            from pipeline.plan import make_plan
            from pipeline.storage import StorageError

            try:
                plan = make_plan(spec)  # read-only: no lease, no recovery, no write
                check_engine(spec)
            except (StorageError, ModelPathError) as exc:
                raise SpecError(str(exc)) from None
            print(f"storage ok: {plan.items_pending} of {plan.items_total} items pending")
            print(describe_input(plan))
    except SpecError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    print(f"ok: {args.spec} (name={spec.name}, run_date={run_date}, output={spec.output.uri})")
    return 0


def describe_input(plan: Plan) -> str:
    """The detected input format and image encoding, and any unreadable shards."""
    lines = [
        f"input: {plan.input_format}, {plan.files_total} file(s); images: {plan.image_encoding}"
    ]
    if plan.items_filtered:
        lines.append(f"input.filter: {plan.items_filtered} row(s) dropped before counting")
    lines += [f"unreadable shard (skipped): {why}" for why in plan.bad_shards.values()]
    return "\n".join(lines)
