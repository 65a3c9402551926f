"""`write_report` / `python -m pipeline report` on synthetic outputs, local and over S3."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from pipeline.__main__ import main as pipeline_main
from pipeline.report import write_report
from pipeline.report.estimate import LlmShape, generation_flops
from pipeline.report.load import filesystem
from tests.report_helpers import SHAPE, rows, run_json, write_output

CONTRACT_KEYS = {
    "gpu_hours_used",
    "gpu_hours_billed",
    "gpu_hours_unpruned_est",
    "gpu_hours_unpruned_ci",
    "gpu_hours_saved",
    "usd_saved",
    "shadow_items",
    "answer_agreement",
    "items_ok",
    "items_error",
    "runs",
}


@pytest.fixture(params=["local", "s3"])
def output_uri(request: pytest.FixtureRequest, tmp_path) -> str:
    """An empty output prefix: a temp folder, or a bucket on the loopback S3 server."""
    if request.param == "local":
        return str(tmp_path / "out")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/captions"


def _read(uri: str) -> str:
    fs, path = filesystem(uri)
    return fs.cat_file(path).decode()


def _small_table() -> dict[str, list]:
    """4 ok rows (2 in the shadow sample) + 1 error row, with round numbers."""
    data = rows(4, shadow=2, errors=1)
    data["gpu_seconds"] = [1.0, 2.0, 3.0, 4.0, 0.0]
    data["shadow_gpu_seconds"] = [3.0, 4.0, None, None, None]
    data["answer"] = ["A cat.", "two dogs on grass", "x", "y", None]
    data["shadow_answer"] = ["a cat", "a dog on the grass", None, None, None]
    return data


def test_estimate_equals_a_hand_computation(output_uri: str) -> None:
    write_output(output_uri, _small_table(), [run_json(actor_seconds=36.0, usd_per_gpu_hour=3.6)])
    written = write_report(output_uri)
    report = json.loads(_read(written["json"]))
    assert set(report) >= CONTRACT_KEYS
    ratio = (3 + 4) / (1 + 2)  # shadow items only
    used_h = (1 + 2 + 3 + 4) / 3600
    assert report["gpu_hours_used"] == pytest.approx(used_h)
    assert report["gpu_hours_billed"] == pytest.approx(36 / 3600)
    assert report["gpu_hours_unpruned_est"] == pytest.approx(used_h * ratio)
    assert report["gpu_hours_saved"] == pytest.approx(used_h * (ratio - 1))
    assert report["usd_saved"] == pytest.approx(used_h * (ratio - 1) * 3.6)
    lo, hi = report["gpu_hours_unpruned_ci"]  # 2 batches: the Student-t interval (1 d.o.f.)
    se = ((3 - ratio) ** 2 + (4 - 2 * ratio) ** 2) ** 0.5 / (2 * 1) ** 0.5 / 1.5
    assert (lo, hi) == pytest.approx((0.0, used_h * (ratio + 12.706 * se)))  # wider than 2..3
    assert (report["items_ok"], report["items_error"], report["shadow_items"]) == (4, 1, 2)
    f1 = (1 + 2 * 0.5 * 0.4 / 0.9) / 2
    assert report["answer_agreement"]["exact_match"] == pytest.approx(0.5)
    assert report["answer_agreement"]["token_f1"] == pytest.approx(f1)
    assert report["quality"]["worst"][0]["unpruned"] == "a dog on the grass"
    assert report["profile"]["errors_by_cause"] == {"undecodable": 1}
    assert report["gpu_hours_unpruned_flops"] > report["gpu_hours_used"]
    assert {"md", "html", "json", "hours.svg"} <= set(written)


def test_failed_attempts_count_as_used_and_once_without_pruning(tmp_path) -> None:
    uri = str(tmp_path / "out")
    data = _small_table()
    data["failed_gpu_seconds"] = [0.0, 0.0, 0.0, 0.5, 2.0]  # a split batch, an error item
    write_output(uri, data, [run_json()])
    written = write_report(uri)
    report = json.loads(_read(written["json"]))
    answered, failed = (1 + 2 + 3 + 4) / 3600, 2.5 / 3600
    assert report["gpu_hours_used"] == pytest.approx(answered + failed)
    assert report["gpu_hours_failed"] == pytest.approx(failed)
    assert report["gpu_hours_unpruned_est"] == pytest.approx(answered * 7 / 3 + failed)
    assert "failed attempts" in _read(written["md"])


def test_compile_and_capture_hours_are_billed_overhead_not_used(tmp_path) -> None:
    """The run summary's compile_seconds show as their own line, inside the billed hours and
    outside the hours used and the estimate (which the items' GPU seconds alone make)."""
    uri = str(tmp_path / "out")
    runs = [run_json(actor_seconds=36.0, compile_seconds=9.0, usd_per_gpu_hour=3.6)]
    write_output(uri, _small_table(), runs)
    written = write_report(uri)
    report = json.loads(_read(written["json"]))
    used_h = (1 + 2 + 3 + 4) / 3600
    assert report["gpu_hours_compile"] == pytest.approx(9 / 3600)
    assert report["usd_compile"] == pytest.approx(9 / 3600 * 3.6)
    assert report["gpu_hours_used"] == pytest.approx(used_h)
    assert report["gpu_hours_unpruned_est"] == pytest.approx(used_h * 7 / 3)
    assert report["runs"][0]["compile_seconds"] == 9.0
    row = _md_row(
        _read(written["md"]), "of which compiling and capturing (billed overhead, not model time)"
    )
    assert _number(row[1]) == pytest.approx(9 / 3600, rel=1e-3)
    before = str(tmp_path / "before")  # summaries written before it was recorded: unknown
    write_output(before, _small_table(), [run_json(actor_seconds=36.0)])
    assert json.loads(_read(write_report(before)["json"]))["gpu_hours_compile"] is None


def test_unknown_price_is_reported_as_unknown(tmp_path) -> None:
    uri = str(tmp_path / "out")
    write_output(uri, rows(20, shadow=5), [run_json(usd_per_gpu_hour=None)])
    written = write_report(uri)
    report = json.loads(_read(written["json"]))
    assert (
        report["usd_saved"] is None and report["usd_used"] is None and report["price"] == "unknown"
    )
    assert report["gpu_hours_saved"] > 0
    assert re.search(r"\| GPU hours saved \| [\d.,]+ \| [^|]+ \| unknown \|", _read(written["md"]))
    priced = json.loads(_read(write_report(uri, price=2.0)["json"]))
    assert priced["usd_saved"] == pytest.approx(priced["gpu_hours_saved"] * 2.0)
    assert priced["price_source"] == "--price"


def test_no_shadow_items_shows_the_flops_estimate_only(output_uri: str) -> None:
    write_output(output_uri, rows(30, shadow=0), [run_json(shadow_fraction=0.0)])
    written = write_report(output_uri)
    report = json.loads(_read(written["json"]))
    assert report["shadow_items"] == 0
    assert report["gpu_hours_unpruned_est"] is None and report["gpu_hours_unpruned_ci"] is None
    assert report["gpu_hours_saved"] is None and report["usd_saved"] is None
    assert report["answer_agreement"]["exact_match"] is None
    assert report["gpu_hours_unpruned_flops"] > report["gpu_hours_used"] > 0
    md = _read(written["md"])
    assert "No shadow items" in md and "FLOPs model" in md


def test_several_nights_give_a_trend(output_uri: str) -> None:
    dates = ["2026-11-22", "2026-11-23", "2026-11-24"]
    for i, date in enumerate(dates):
        night = f"{output_uri}/run_date={date}"
        write_output(
            night, rows(40 + 10 * i, run_date=date, shadow=10, seed=i), [run_json(run_date=date)]
        )
    written = write_report(output_uri)
    report = json.loads(_read(written["json"]))
    assert [n["run_date"] for n in report["nights"]] == dates
    assert [n["items_ok"] for n in report["nights"]] == [40, 50, 60]
    total = sum(n["gpu_hours_used"] for n in report["nights"])
    assert report["gpu_hours_used"] == pytest.approx(total)
    assert report["gpu_hours_billed"] == pytest.approx(3.0)
    assert len(report["runs"]) == 3 and "trend.svg" in written
    md = _read(written["md"])
    assert "Trend over nights" in md and all(d in md for d in dates) and "(trend.svg)" in md
    assert _read(written["trend.svg"]).lstrip().startswith("<?xml")


def test_resumed_runs_add_up_without_double_counting(tmp_path) -> None:
    uri = str(tmp_path / "out")
    first = rows(10, run_id="a", shadow=2)
    second = rows(6, run_id="b", shadow=2, seed=1)
    second["id"] = [f"second-{i}" for i in range(6)]
    first_run = run_json("a", actor_seconds=100.0, keep="64", items_processed=10)
    write_output(uri, first, [first_run], name="part-0.parquet")
    runs = [
        run_json(
            "b", actor_seconds=50.0, keep="32", started_at="2026-11-24T03:00:00Z", items_processed=6
        )
    ]
    write_output(uri, second, runs, name="part-1.parquet")
    report = json.loads(_read(write_report(uri)["json"]))
    assert (report["items_ok"], report["shadow_items"]) == (16, 4)
    assert report["gpu_hours_billed"] == pytest.approx(150 / 3600)
    assert report["config"]["keep"] == "32"  # the newest run's config
    assert sorted(r["run_id"] for r in report["runs"]) == ["a", "b"]
    assert report["runs_without_summary"] == [] and report["items_processed_by_runs"] == 16


def test_rows_without_a_run_summary_are_flagged(tmp_path) -> None:
    uri = str(tmp_path / "out")
    write_output(uri, rows(5, run_id="a"), [run_json("a")], name="part-0.parquet")
    write_output(uri, rows(4, run_id="ghost", seed=2), [], name="part-1.parquet")
    written = write_report(uri)
    report = json.loads(_read(written["json"]))
    assert report["items_ok"] == 9 and report["runs_without_summary"] == ["ghost"]
    assert report["gpu_hours_billed"] == pytest.approx(1.0)  # only the summarised run
    assert "have no \\_runs/\\*.json summary" in _read(written["md"])


def _md_row(md: str, label: str) -> list[str]:
    line = next(line for line in md.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def _number(text: str) -> float:
    return float(text.replace("$", "").replace(",", ""))


def test_markdown_shows_the_json_numbers(tmp_path) -> None:
    uri = str(tmp_path / "out")
    write_output(uri, rows(200, shadow=40, errors=3, seed=4), [run_json(actor_seconds=777.0)])
    written = write_report(uri)
    report, md = json.loads(_read(written["json"])), _read(written["md"])
    used = _md_row(md, "GPU hours used (measured per item)")
    assert _number(used[1]) == pytest.approx(report["gpu_hours_used"], rel=1e-3)
    assert _number(used[3]) == pytest.approx(report["usd_used"], abs=0.005)
    billed = _md_row(md, "GPU hours billed (actors' held time)")
    assert _number(billed[1]) == pytest.approx(report["gpu_hours_billed"], rel=1e-3)
    est = _md_row(md, "GPU hours without pruning (measured on shadow sample)")
    assert _number(est[1]) == pytest.approx(report["gpu_hours_unpruned_est"], rel=1e-3)
    lo, hi = (_number(x) for x in est[2].split(" – "))
    assert [lo, hi] == pytest.approx(report["gpu_hours_unpruned_ci"], rel=1e-3)
    saved = _md_row(md, "GPU hours saved")
    assert _number(saved[1]) == pytest.approx(report["gpu_hours_saved"], rel=1e-3)
    assert _number(saved[3]) == pytest.approx(report["usd_saved"], abs=0.005)
    assert f"items ok {report['items_ok']}, items error {report['items_error']}" in md
    n = f"over {report['shadow_items']} shadow item(s) in {report['shadow_batches']} batch(es)"
    assert n in md
    assert f"Exact match: {100 * report['answer_agreement']['exact_match']:.1f}%" in md


def test_untrusted_answers_are_escaped(tmp_path) -> None:
    uri = str(tmp_path / "out")
    data = rows(3, shadow=3)
    evil = '<script>alert("x")</script> | ![img](http://evil.example/a.png) <img src=x onerror=1>'
    data["answer"] = [evil, "nul\x00 esc\x1b[2J bidi\u202eevil line\u2028sep", "fine"]
    tiny = run_json(model_shape={**SHAPE, "tiny_random": True})
    write_output(uri, data, [tiny])
    written = write_report(uri)
    html, md = _read(written["html"]), _read(written["md"])
    assert "<script>" not in html and "<img" not in html and "&lt;script&gt;" in html
    assert "Content-Security-Policy" in html and "<svg" in html  # charts inline
    assert not re.search(r"""(src|href)\s*=\s*["'](?!#|data:)""", html), "an external resource"
    assert "<script>" not in md and "![img]" not in md and "\\<script\\>" in md
    for text in (html, md):  # control characters become visible escapes, never raw bytes
        assert not any(c in text for c in "\x00\x1b\u202e\u2028")
    assert "nul\\x00 esc\\x1b[2J bidi\\u202eevil line sep" in html  # U+2028 is a space
    assert "nul\\\\x00 esc\\\\x1b\\[2J" in md  # backslashes escaped for Markdown
    assert "tiny random-weight test models" in md and "tiny random-weight" in html


def test_cli_prints_markdown_and_writes_only_the_asked_formats(tmp_path, capsys) -> None:
    uri = str(tmp_path / "out")
    write_output(uri, rows(10, shadow=2), [run_json(usd_per_gpu_hour=None)])
    assert pipeline_main(["report", uri, "--price", "4", "--format", "md,json"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Cost report") and "$4.00 per GPU hour (--price)" in out
    assert (tmp_path / "out/_report/report.json").exists()
    assert not (tmp_path / "out/_report/report.html").exists()
    assert pipeline_main(["report", str(tmp_path / "missing")]) == 2
    assert "no such output" in capsys.readouterr().err


def test_files_with_fewer_or_differently_typed_columns_still_load(tmp_path) -> None:
    uri = str(tmp_path / "out")
    minimal = [
        "id",
        "question",
        "answer",
        "status",
        "error",
        "model",
        "pruner",
        "visual_tokens",
        "kept_tokens",
        "retained_energy",
        "prompt_tokens",
        "prompt_tokens_unpruned",
        "new_tokens",
        "gpu_seconds",
        "run_id",
    ]
    old = {k: v for k, v in rows(6, seed=5).items() if k in minimal}
    old["id"] = [f"old-{i}" for i in range(6)]
    old["keep"] = [64] * 6  # an int where the contract says string
    write_output(uri, old, [run_json()], name="part-0.parquet")
    write_output(uri, rows(4, shadow=4), [], name="part-1.parquet")
    report = json.loads(_read(write_report(uri)["json"]))
    assert (report["items_ok"], report["shadow_items"]) == (10, 4)
    assert report["profile"]["stage_seconds"]["generate_s"] > 0


def test_energy_budget_kept_tokens_show_as_a_distribution_and_drive_the_flops(tmp_path) -> None:
    """Per-item kept tokens (an energy budget): their histogram, quantiles, and a FLOPs
    estimate from each item's own prompt, equal to fixed rows with the same prompts."""
    kept = [16, 16, 20, 33, 40, 64, 90, 192]
    data = rows(len(kept))
    data["keep"] = ["energy=0.95,min=16,max=192"] * len(kept)
    data["kept_tokens"] = kept
    data["prompt_tokens"] = [36 + k for k in kept]
    uri = str(tmp_path / "energy")
    write_output(uri, data, [run_json(keep="energy=0.95,min=16,max=192")])
    written = write_report(uri)
    report = json.loads(_read(written["json"]))
    dist = report["profile"]["kept_tokens"]
    assert (dist["min"], dist["median"], dist["max"]) == (16, 36.5, 192)
    assert sum(dist["counts"]) == len(kept) and dist["edges"][0] == 16 <= 192 < dist["edges"][-1]
    assert "kept_tokens.svg" in written and "kept_tokens.svg" in _read(written["html"])
    assert "| 16 / 36.5 / " in _read(written["md"])
    shape, new = LlmShape.from_dict(SHAPE), np.array(data["new_tokens"])
    pruned = generation_flops(shape, np.array(data["prompt_tokens"]), new).sum()
    unpruned = generation_flops(shape, np.array(data["prompt_tokens_unpruned"]), new).sum()
    assert report["flops_ratio"] == pytest.approx(unpruned / pruned)  # item by item


def test_billed_gap_unknown_compile_cost_and_idle_runs(tmp_path) -> None:
    """A newcomer's first report: billed far above used says why; compile cost without a
    price is unknown (not $0.00); a rerun that did nothing is not a "finished 0 / 0" row."""
    uri = str(tmp_path / "out")
    runs = [
        run_json("r1", actor_seconds=140.0, compile_seconds=0.0, usd_per_gpu_hour=None),
        run_json("idle", actor_seconds=0.0, items_processed=0, status="finished"),
    ]
    runs[1]["usd_per_gpu_hour"] = None
    write_output(uri, _small_table(), runs)  # 10 s used
    written = write_report(uri)
    md = _read(written["md"])
    report = json.loads(_read(written["json"]))
    assert report["usd_compile"] is None
    row = _md_row(md, "of which compiling and capturing (billed overhead, not model time)")
    assert row[3] == "unknown"
    assert "Billed hours are 14.0x the hours used" in md
    runs_table = md.split("## Runs", 1)[1].split("##", 1)[0]
    assert "| r1 |" in runs_table and "idle" not in runs_table
    assert "1 run(s) found every row already committed and did nothing" in runs_table
    assert sorted(r["run_id"] for r in report["runs"]) == ["idle", "r1"]  # the JSON keeps both
