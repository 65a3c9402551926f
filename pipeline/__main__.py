"""`python -m pipeline <command>`: the public entry points of the job.

Each command lives in its own module exposing ``add_arguments(parser)`` and
``main(args) -> int``; modules are imported lazily so `validate` never imports Ray or torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

COMMANDS = {
    "run": ("pipeline.cli.run", "Run a job spec on the current Ray cluster (or a local one)."),
    "validate": ("pipeline.cli.validate", "Check a job spec or an eval file without running it."),
    "submit": ("pipeline.cli.submit", "Submit a job spec to a Ray cluster through the Jobs SDK."),
    "report": ("pipeline.report.cli", "Write the cost report of a run's output."),
    "eval": ("pipeline.eval.cli", "Answer a labelled set under several pruners; score; gate."),
    "render-k8s": ("pipeline.k8s", "Render KubeRay manifests for a job spec into infra/."),
    "demo": (
        "pipeline.cli.demo",
        "Run the whole job on the bundled sample (local Ray, tiny model).",
    ),
    "tiny": ("pipeline.cli.tiny", "Build a tiny random-weight checkpoint to try jobs with."),
    "schemas": ("pipeline.cli.schemas", "Regenerate the JSON/Arrow schemas in schemas/."),
}


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and dispatch to the command's module."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return int(importlib.import_module(COMMANDS[args.command][0]).main(args) or 0)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The parsed command line (only the chosen command's module is imported)."""
    parser = argparse.ArgumentParser(prog=_prog(), description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, (module, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).add_arguments(cmd)
    return parser.parse_args(argv)


def _prog() -> str:
    """`pipeline` from the console script, `python -m pipeline` from `-m`."""
    name = Path(sys.argv[0]).name
    return "python -m pipeline" if name in ("__main__.py", "") else name


if __name__ == "__main__":
    sys.exit(main())
