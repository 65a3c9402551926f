"""`python -m pipeline eval EVAL.yaml [--fail-below R] [--set a.b=v ...]`: eval and gate.

Exit codes: 0 done (and the gate passed, when given); 1 the configured pruner's relative
performance is below ``--fail-below`` (or unknown: the reference scored 0), or the eval
failed; 2 a whole-job problem (bad spec, storage, columns, model path), before any model.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.cli.run import add_common
from pipeline.io.storage import redact
from pipeline.spec import SpecError, load_spec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The common arguments plus --fail-below and --progress."""
    add_common(
        parser,
        spec_help="eval file YAML: a job spec whose input is a labelled set, with an eval: "
        "section of configurations (e.g. jobs/eval-llava15.yaml; docs/eval.md)",
    )
    parser.add_argument(
        "--fail-below",
        type=float,
        default=None,
        metavar="R",
        help="exit 1 when the configured pruner's relative performance is below R (e.g. 0.95)",
    )
    parser.add_argument("--progress", action="store_true", help="show Ray Data progress bars")


def main(args: argparse.Namespace) -> int:
    """Run the eval, print one line per configuration and the gate's verdict."""
    from pipeline.eval.spec import EvalSpec
    from pipeline.io.storage import StorageError
    from pipeline.job.checks import ModelPathError
    from pipeline.job.connect import ClusterUnreachable

    try:
        spec, run_date = load_spec(
            args.spec, run_date=args.run_date, overrides=args.overrides, kind=EvalSpec
        )
        from pipeline.eval.evaluate import evaluate

        summary = evaluate(spec, run_date, threshold=args.fail_below, progress=args.progress)
    except (SpecError, StorageError, ModelPathError, ClusterUnreachable) as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except Exception as exc:  # the CLI edge: one line
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"error: eval failed: {type(exc).__name__}: {redact(first)}", file=sys.stderr)
        return 1
    for line in summary_lines(summary):
        print(line)
    return _verdict(summary, args.fail_below)


def summary_lines(summary: dict) -> list[str]:
    """One line per configuration: kept tokens, metric, relative performance."""
    metric = summary["metric"]
    lines = []
    for label, c in summary["configs"].items():
        rel = "unknown" if c["relative"] is None else f"{c['relative']:.3f}"
        score = "unknown" if c[metric] is None else f"{c[metric]:.4f}"
        tokens = c["kept_tokens_per_item"]
        kept = "unknown" if tokens is None else f"{tokens:.1f}"
        lines.append(f"{label:>24}: {kept} kept tokens/item, {metric} {score}, relative {rel}")
    lines.append(f"wrote {summary['files']['eval.md']} (+ eval.json, eval.html, predictions)")
    return lines


def _verdict(summary: dict, threshold: float | None) -> int:
    if threshold is None:
        return 0
    from pipeline.eval.summary import gate_passes

    gate = summary["gate"]
    ok = gate_passes(summary, threshold)
    rel = "unknown" if gate["relative"] is None else f"{gate['relative']:.3f}"
    verdict = "passed" if ok else "FAILED"
    print(
        f"gate {verdict}: {gate['config']} relative {summary['metric']} {rel} "
        f"(threshold {threshold:g})",
        file=sys.stdout if ok else sys.stderr,
    )
    return 0 if ok else 1
