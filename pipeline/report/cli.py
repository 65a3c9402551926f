"""`python -m pipeline report OUTPUT_URI [--price USD] [--format md,html,json]`.

Writes `_report/` under the output prefix and prints the Markdown. Exit status 2 when the
prefix cannot be reported on (one line on stderr). Non-goals: any number crunching.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.report.api import FORMATS, write_report
from pipeline.report.load import ReportInputError, filesystem


def _formats(text: str) -> tuple[str, ...]:
    chosen = tuple(f.strip() for f in text.split(",") if f.strip())
    bad = [f for f in chosen if f not in FORMATS]
    if bad or not chosen:
        raise argparse.ArgumentTypeError(f"formats are a comma list of {', '.join(FORMATS)}")
    return chosen


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the command's arguments."""
    parser.add_argument("output_uri", help="the job's output folder or s3:// prefix")
    parser.add_argument(
        "--price",
        type=float,
        default=None,
        help="USD per GPU hour (default: the run summaries' cost.usd_per_gpu_hour; else unknown)",
    )
    parser.add_argument(
        "--format",
        type=_formats,
        default=FORMATS,
        help="comma list of md, html, json (default: all)",
    )


def main(args: argparse.Namespace) -> int:
    """Write the report and print its Markdown (or the paths written when md is not asked)."""
    if args.price is not None and args.price < 0:
        print("report: --price must be >= 0", file=sys.stderr)
        return 2
    try:
        written = write_report(args.output_uri, price=args.price, formats=args.format)
    except ReportInputError as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 2
    if "md" in written:
        fs, path = filesystem(written["md"])
        print(fs.cat_file(path).decode())
    for name in ("md", "html", "json"):
        if name in written:
            print(f"wrote {written[name]}", file=sys.stderr)
    return 0
