"""The cost report on a REAL pipeline output (tiny LLaVA on one Ray session), local and S3.

The job runs with a known shadow fraction; the report's numbers are checked against the
result Parquet and the run summary read back independently with pyarrow.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.dataset as pads
import pytest

from pipeline.__main__ import main as pipeline_main
from pipeline.cli import demo
from pipeline.job import runner
from pipeline.report.load import filesystem
from pipeline.spec import load_spec

DATE = "2026-11-24"
PRICE = 2.0


pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def model_and_input(
    tmp_path_factory: pytest.TempPathFactory, tiny_llava: Path
) -> tuple[Path, Path]:
    """A tiny random-weight LLaVA and the demo's input (6 good rows, 2 bad)."""
    root = tmp_path_factory.mktemp("report-e2e")
    demo.write_input(root / "input")
    return tiny_llava, root / "input"


def _expected(uri: str) -> dict[str, float]:
    """The report's headline numbers recomputed from the files with pyarrow alone."""
    fs, root = filesystem(uri)
    table = pads.dataset(root, filesystem=fs, format="parquet").to_table()
    ok = pc.equal(table["status"], "ok")
    table = table.append_column(
        "bucket", pc.power(2, pc.floor(pc.log2(pc.cast(table["batch_size"], "float64"))))
    )
    answered = table.filter(pc.is_valid(table["gpu_seconds"]))
    hours = answered.group_by("bucket").aggregate([("gpu_seconds", "sum")])
    shadow = table.filter(
        pc.and_(pc.and_(ok, table["shadow"]), pc.is_valid(table["shadow_gpu_seconds"]))
    )
    per_batch = shadow.group_by(["batch_id", "bucket"]).aggregate(
        [("gpu_seconds", "sum"), ("shadow_gpu_seconds", "sum")]
    )
    by_bucket = (
        per_batch.group_by("bucket")
        .aggregate(
            [("gpu_seconds_sum", "sum"), ("shadow_gpu_seconds_sum", "sum"), ("batch_id", "count")]
        )
        .to_pylist()
    )
    pooled = pc.sum(shadow["shadow_gpu_seconds"]).as_py() / pc.sum(shadow["gpu_seconds"]).as_py()
    ratio = {  # a bucket's own ratio from 3 shadow batches on, else the pooled one
        b["bucket"]: b["shadow_gpu_seconds_sum_sum"] / b["gpu_seconds_sum_sum"]
        for b in by_bucket
        if b["batch_id_count"] >= 3
    }
    failed = pc.sum(table["failed_gpu_seconds"]).as_py() or 0.0
    unpruned = sum(h["gpu_seconds_sum"] * ratio.get(h["bucket"], pooled) for h in hours.to_pylist())
    (run_file,) = fs.glob(f"{root}/_runs/*.json")
    run = json.loads(fs.cat_file(run_file))
    return {
        "used": (pc.sum(table["gpu_seconds"]).as_py() + failed) / 3600,
        "unpruned": (unpruned + failed) / 3600,
        "shadow": shadow.num_rows,
        "ok": pc.sum(ok).as_py(),
        "billed": run["actor_seconds"] / 3600,
        "rows": table.num_rows,
    }


def _read(uri: str) -> str:
    fs, path = filesystem(uri)
    return fs.cat_file(path).decode()


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "backend,fraction", [("local", 1.0), pytest.param("s3", 0.5, marks=pytest.mark.slow)]
)
def test_report_on_a_real_run(
    backend, fraction, model_and_input, tmp_path, request, capsys
) -> None:
    model, inp = model_and_input
    out = (
        str(tmp_path / "out")
        if backend == "local"
        else f"s3://{request.getfixturevalue('s3_bucket')}/captions/run_date={DATE}"
    )
    spec, _ = load_spec(
        demo.JOB,
        run_date=DATE,
        overrides=[
            f"input.uri={inp}",
            f"model.path={model}",
            f"output.uri={out}",
            f"cost.shadow_fraction={fraction}",
            f"cost.usd_per_gpu_hour={PRICE}",
            "cost.gpu_type=H100",
        ],
    )
    doc = runner.run_job(spec, DATE, progress=False)
    assert doc["status"] == "finished"
    assert pipeline_main(["report", out]) == 0
    assert "\n# Cost report: " in "\n" + capsys.readouterr().out  # Ray may log to stdout too
    report = json.loads(_read(f"{out}/_report/report.json"))
    want = _expected(out)
    assert (report["items_ok"], report["items_error"]) == (want["ok"], want["rows"] - want["ok"])
    assert report["shadow_items"] == want["shadow"] > 0
    if fraction == 1.0:
        assert report["shadow_items"] == report["items_ok"]
    assert report["gpu_hours_used"] == pytest.approx(want["used"])
    assert report["gpu_hours_billed"] == pytest.approx(want["billed"])
    assert report["gpu_hours_unpruned_est"] == pytest.approx(want["unpruned"])
    saved = want["unpruned"] - want["used"]
    assert report["usd_saved"] == pytest.approx(saved * PRICE)
    assert report["gpu_hours_unpruned_flops"] is not None  # model_shape came through
    assert report["tiny_random_model"] is True  # resprune.tiny marked its config
    assert report["runs"][0]["run_id"] == doc["run_id"]
    assert report["profile"]["errors_by_cause"]  # the demo's two bad rows
    html = _read(f"{out}/_report/report.html")
    assert "<svg" in html and "<script" not in html
