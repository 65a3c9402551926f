"""`python -m pipeline demo`: the whole job on the embedded default, in a few minutes on a laptop.

Builds a tiny random-weight LLaVA (resprune.tiny), writes a two-shard Parquet input from the
bundled real images (pipeline/assets/images: CC0 / public domain) with a few questions, one
row without a question (captioning) and two deliberately bad rows (a truncated JPEG and a
1x4000 image) to show per-row error handling, then runs the demo spec (``jobs/demo.yaml``,
shipped inside the package as ``pipeline/assets/demo.yaml``) on a local Ray into
``demo-output/`` and writes the cost report. A second demo resumes: finished results are
kept, so it does no model work (``--fresh`` starts over). With the default ``--out`` the spec
runs exactly as written (its paths are relative to the working directory), so
``python -m pipeline run jobs/demo.yaml`` afterwards continues the same output.
Answers are random text: the weights are random. Non-goal: a quality demo.
"""

from __future__ import annotations

import argparse
import io
import shutil
from importlib import resources
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]  # the pipeline package
IMAGES = ROOT / "assets" / "images"
JOB = resources.files("pipeline") / "assets" / "demo.yaml"
DEFAULT_OUT = "demo-output"
QUESTIONS = [
    "What is in this picture?",
    "What colours dominate the image?",
    None,
    "Is there a person in the image?",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--out (default demo-output) and --fresh (delete earlier results instead of resuming)."""
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for model, input, results")
    parser.add_argument(
        "--fresh", action="store_true", help="delete earlier results and start over"
    )


def sample_rows() -> list[dict]:
    """Rows of the demo input: bundled images with questions, plus two bad rows."""
    rows = []
    for i, path in enumerate(sorted(p for p in IMAGES.iterdir() if p.suffix in (".jpg", ".png"))):
        rows.append(
            {
                "id": f"img-{i:03d}",
                "image": path.read_bytes(),
                "question": QUESTIONS[i % len(QUESTIONS)],
                "source": path.name,
            }
        )
    first = rows[0]["image"]
    rows.append(
        {
            "id": "bad-truncated",
            "image": first[: len(first) // 3],
            "question": "What is this?",
            "source": "truncated copy",
        }
    )
    thin = io.BytesIO()
    Image.new("RGB", (1, 4000), "gray").save(thin, format="PNG")
    rows.append(
        {"id": "bad-thin", "image": thin.getvalue(), "question": None, "source": "1x4000 synthetic"}
    )
    return rows


def write_input(folder: Path) -> int:
    """Write the sample as two Parquet shards; returns the row count."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = sample_rows()
    half = len(rows) // 2
    for n, part in enumerate((rows[:half], rows[half:])):
        pq.write_table(pa.Table.from_pylist(part), folder / f"shard-{n:03d}.parquet")
    return len(rows)


def main(args: argparse.Namespace) -> int:
    """Prepare model and input, run (or resume) the job, print where results and report are."""
    from pipeline.job import console, runner
    from pipeline.output import summary
    from pipeline.spec import load_spec

    console.quiet(progress=console.show_progress(None))
    out = Path(args.out)
    _prepare(out, fresh=args.fresh)
    overrides = []  # the default folder is the spec's own: run it as written
    if out.resolve() != Path(DEFAULT_OUT).resolve():
        folders = {"input.uri": "input", "model.path": "model", "output.uri": "results"}
        overrides = [f"{key}={out / name}" for key, name in folders.items()]
    with resources.as_file(JOB) as job:
        spec, run_date = load_spec(job, overrides=overrides)
    print(f"demo: running {spec.name} on {spec.input.uri} -> {spec.output.uri}", flush=True)
    doc = runner.run_job(spec, run_date, progress=None)
    _report(spec.output.uri)
    print(summary.one_line(doc), flush=True)
    print(closing_line(doc), flush=True)
    return 0 if doc["status"] == "finished" else 1


def closing_line(doc: dict) -> str:
    """The demo's last line: what its error rows are, or why it did nothing."""
    if doc["items_processed"] == 0 and doc["items_skipped"] == doc["items_total"]:
        return (
            "demo: nothing left to do, an earlier demo committed every row (resumed; --fresh "
            "starts over)"
        )
    causes = ", ".join(f"{c} {n}" for c, n in sorted(doc["errors_by_cause"].items()))
    return (
        f"demo: the {doc['items_error']} error rows ({causes}) are the deliberate bad inputs, "
        "a truncated JPEG and a 1x4000 image: a bad row gets status error and a cause, and "
        "never stops the job"
    )


def _prepare(out: Path, *, fresh: bool) -> None:
    """Build the tiny model and the input once; --fresh drops earlier results."""
    if fresh:
        shutil.rmtree(out / "results", ignore_errors=True)
    if not (out / "model" / "config.json").is_file():
        from resprune.tiny import build_tiny_checkpoint  # torch and transformers: seconds

        print(f"demo: building a tiny random-weight LLaVA in {out / 'model'}", flush=True)
        # wide enough that keep 64 is a real choice (D > k) and the LLM dominates the cost
        build_tiny_checkpoint(
            "llava", out / "model", text_hidden=256, text_layers=4, text_intermediate=512
        )
    n = write_input(out / "input")  # the same bytes every time: a rerun still resumes
    print(f"demo: {n} input rows from {IMAGES} in {out / 'input'}", flush=True)


def _report(output_uri: str) -> None:
    from pipeline.report import write_report

    written = write_report(output_uri)
    print(f"demo: cost report {written['html']} (report.md, report.json beside it)", flush=True)
