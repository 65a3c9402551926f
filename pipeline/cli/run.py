"""`python -m pipeline run JOB.yaml [--run-date D] [--set a.b=v ...]`: run or resume a job.

Whole-job problems (bad spec, unreachable storage, missing columns, bad model path) end
with one line on stderr and exit code 2, before any model is loaded. A run whose items
fail beyond ``execution.max_error_fraction``, that leaves items unanswered (transient
faults), or that cannot progress (a systemic fault, named in one line) exits 1, as does
one whose model actors cannot start within ``execution.startup_timeout_s``, whose Ray
cluster goes away (`pipeline.job.watchdog`) or that fails its ``gate:`` (`pipeline.monitoring`).
Credentials never appear in output.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.io.storage import redact
from pipeline.spec import SpecError, load_spec

EPILOG = """\
exit codes:
  0    the run finished (and passed its gate, when the spec has one)
  1    the run failed: errors above execution.max_error_fraction, items left unanswered,
       a systemic fault, model actors that could not start, the Ray cluster gone, or a
       failed gate (the summary line and _runs/<run_id>.json say which)
  2    a whole-job problem found before any model loads (bad spec, storage, columns,
       model path, a RAY_ADDRESS that does not answer)
  130  interrupted; committed rows are kept and a rerun does the rest

Ray: RAY_ADDRESS=local starts a private local Ray cluster; RAY_ADDRESS=host:port (or
ray://...) joins that cluster; unset, a cluster `ray start` left on this machine is joined,
else a local one is started."""


def add_common(
    parser: argparse.ArgumentParser, spec_help: str = "job spec YAML (see jobs/)"
) -> None:
    """Arguments shared by run/validate/submit/eval: the spec, its run date and overrides."""
    parser.add_argument("spec", help=spec_help)
    parser.add_argument(
        "--run-date", default=None, help="YYYY-MM-DD for {run_date} (default: today, UTC)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a spec value (YAML syntax), e.g. --set execution.gpus_per_actor=0",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The common arguments plus --no-progress; the help states the exit codes."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    add_common(parser)
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="hide Ray Data progress bars (shown by default only on a terminal; elsewhere a "
        "progress line every monitoring.progress_interval_s)",
    )


def main(args: argparse.Namespace) -> int:
    """Run the job and print the one-line summary."""
    from pipeline.io.storage import StorageError
    from pipeline.job.checks import ModelPathError
    from pipeline.job.connect import ClusterUnreachable

    try:
        spec, run_date = load_spec(args.spec, run_date=args.run_date, overrides=args.overrides)
        from pipeline.job import runner
        from pipeline.output import summary

        doc = runner.run_job(spec, run_date, progress=False if args.no_progress else None)
    except (SpecError, StorageError, ModelPathError, ClusterUnreachable) as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the summary is written and the lease released by then
        print(
            "error: run interrupted; committed rows are kept, a rerun does the rest",
            file=sys.stderr,
        )
        return 130
    except Exception as exc:  # the CLI edge: one line (Ray has logged the details)
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"error: run failed: {type(exc).__name__}: {redact(first)}", file=sys.stderr)
        return 1
    print(summary.one_line(doc), flush=True)
    return 0 if doc["status"] == "finished" else 1
