"""`python -m pipeline demo`: the whole job on the embedded default, in a few minutes on a laptop.

Builds a tiny random-weight LLaVA (resprune.tiny), writes a two-shard Parquet input from the
bundled real images (pipeline/assets/images: CC0 / public domain) with a few questions, one
row without a question (captioning) and two deliberately bad rows (a truncated JPEG and a
1x4000 image) to show per-row error handling, then runs jobs/demo.yaml on a local Ray into
``demo-output/`` and writes the cost report.
Answers are random text: the weights are random. Non-goal: a quality demo.
"""

from __future__ import annotations

import argparse
import io
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

ROOT = Path(__file__).resolve().parent
IMAGES = ROOT / "assets" / "images"
JOB = ROOT.parent / "jobs" / "demo.yaml"
QUESTIONS = ["What is in this picture?", "What colours dominate the image?", None,
             "Is there a person in the image?"]  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--out (default demo-output) and --keep-results (resume instead of starting over)."""
    parser.add_argument("--out", default="demo-output", help="folder for model, input, results")
    parser.add_argument("--keep-results", action="store_true", help="resume into existing results")


def sample_rows() -> list[dict]:
    """Rows of the demo input: bundled images with questions, plus two bad rows."""
    rows = []
    for i, path in enumerate(sorted(p for p in IMAGES.iterdir() if p.suffix in (".jpg", ".png"))):
        rows.append({"id": f"img-{i:03d}", "image": path.read_bytes(),
                     "question": QUESTIONS[i % len(QUESTIONS)], "source": path.name})  # fmt: skip
    first = rows[0]["image"]
    rows.append({"id": "bad-truncated", "image": first[: len(first) // 3],
                 "question": "What is this?", "source": "truncated copy"})  # fmt: skip
    thin = io.BytesIO()
    Image.new("RGB", (1, 4000), "gray").save(thin, format="PNG")
    rows.append({"id": "bad-thin", "image": thin.getvalue(), "question": None,
                 "source": "1x4000 synthetic"})  # fmt: skip
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
    """Prepare model and input, run the job, print where the results (and report) are."""
    from pipeline import runner, summary
    from pipeline.spec import load_spec
    from resprune.tiny import build_tiny_checkpoint

    out = Path(args.out).resolve()
    if not (out / "model" / "config.json").is_file():
        # wide enough that keep 64 is a real choice (D > k) and the LLM dominates the cost
        build_tiny_checkpoint(
            "llava", out / "model", text_hidden=256, text_layers=4, text_intermediate=512
        )
    n = write_input(out / "input")
    if not args.keep_results:
        shutil.rmtree(out / "results", ignore_errors=True)
    spec, run_date = load_spec(JOB, overrides=[
        f"input.uri={out / 'input'}", f"model.path={out / 'model'}",
        f"output.uri={out / 'results'}"])  # fmt: skip
    print(f"demo: {n} rows from {IMAGES} -> {out / 'results'}", flush=True)
    doc = runner.run_job(spec, run_date)
    print(summary.one_line(doc))
    _report(str(out / "results"))
    return 0 if doc["status"] == "finished" else 1


def _report(output_uri: str) -> None:
    from pipeline.report import write_report

    for kind, path in write_report(output_uri).items():
        print(f"report ({kind}): {path}")
