"""`python -m pipeline validate SPEC.yaml [--deep]`: check a job spec or an eval file, unrun.

A file with an ``eval:`` section is an eval file (`pipeline eval`'s), else a job spec. Plain
validation imports neither Ray nor torch: it parses the spec (unknown keys are errors; every
problem is listed with its key path), then checks what needs no data read: a local input's
format and column types from its files' metadata (Parquet footers, Arrow stream schemas; an
eval file's references column too) and a local model folder's ``config.json``. ``--deep``
also checks storage, ids, the model path, the output prefix's fingerprint and that the
engine is installed (still no Ray, no weights). It never writes: no probe, no lease, no
recovery (a prefix is left byte-identical).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from pipeline.cli.run import add_common
from pipeline.io.storage import redact
from pipeline.spec import JobSpec, SpecError, load_spec

if TYPE_CHECKING:
    from pipeline.job.plan import Plan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The spec, --run-date, --set, and --deep."""
    add_common(parser)
    parser.add_argument(
        "--deep", action="store_true", help="also check storage, columns, model path, engine"
    )


def main(args: argparse.Namespace) -> int:
    """Print `ok: ...` or every problem; exit 0 or 2."""
    from pipeline.io.storage import StorageError
    from pipeline.job.checks import ModelPathError

    try:
        spec, run_date = load_spec(
            args.spec, run_date=args.run_date, overrides=args.overrides, kind=_kind(args.spec)
        )
        try:
            for line in _deep(spec) if args.deep else _quick(spec):
                print(line)
        except (StorageError, ModelPathError) as exc:
            raise SpecError(str(exc)) from None
    except SpecError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    what = "eval file" if _references(spec) else "job spec"
    print(
        f"ok: {args.spec} ({what}, name={spec.name}, run_date={run_date}, output={spec.output.uri})"
    )
    return 0


def _kind(path: str) -> type[JobSpec] | None:
    """EvalSpec for a file with an ``eval:`` section (unreadable files fail in load_spec)."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    if isinstance(raw, dict) and "eval" in raw:
        from pipeline.eval.spec import EvalSpec

        return EvalSpec
    return None


def _references(spec: JobSpec) -> str | None:
    section = getattr(spec, "eval", None)
    return section.references_column if section is not None else None


def _job(spec: JobSpec) -> JobSpec:
    """The job a spec runs: an eval file's passes its references column through."""
    if _references(spec) is None:
        return spec
    from pipeline.eval.spec import job_of

    return job_of(spec)  # type: ignore[arg-type]


def _deep(spec: JobSpec) -> list[str]:
    """Storage, ids, model path, output fingerprint and engine (read-only)."""
    from pipeline.job.checks import check_engine
    from pipeline.job.plan import make_plan

    job = _job(spec)
    plan = make_plan(job)  # read-only: no lease, no recovery, no write
    check_engine(job)
    refs = _references(spec)
    if refs is not None:
        from pipeline.eval.spec import check_references

        check_references(spec.input.uri, plan.passthrough, refs)
    return [
        f"storage ok: {plan.items_pending} of {plan.items_total} items pending",
        describe_input(plan),
    ]


def _quick(spec: JobSpec) -> list[str]:
    """What needs no data read: a local input's column types, a local model's config.json."""
    import pyarrow.fs as pafs

    from pipeline.io.inputs import check_schema
    from pipeline.io.storage import filesystem, is_remote
    from pipeline.job.checks import check_model_path

    job, lines = _job(spec), []
    if is_remote(job.input.uri):
        lines.append("input: on S3, checked by --deep")
    else:
        fs, path = filesystem(job.input.uri, job.storage)
        glob = any(c in path for c in "*?[")
        if not glob and fs.get_file_info(path).type == pafs.FileType.NotFound:
            lines.append(f"input: nothing at {job.input.uri} yet (--deep checks it)")
        else:
            line, schema = check_schema(fs, path, job.input)
            refs = _references(spec)
            if refs is not None and schema is not None:
                from pipeline.eval.spec import check_references

                check_references(job.input.uri, schema, refs)
            lines.append(line)
    model = job.model.path
    if not is_remote(model) and os.path.isdir(model):
        check_model_path(job)
    return lines


def describe_input(plan: Plan) -> str:
    """The detected input format and image encoding, and any unreadable shards."""
    lines = [
        f"input: {plan.input_format}, {plan.files_total} file(s); images: {plan.image_encoding}"
    ]
    if plan.items_filtered:
        lines.append(f"input.filter: {plan.items_filtered} row(s) dropped before counting")
    lines += [f"unreadable shard (skipped): {why}" for why in plan.bad_shards.values()]
    return "\n".join(lines)
