"""The on-call's view of real runs (one Ray session, one model run): live metrics on the
node's Prometheus endpoint during the run, progress lines without a terminal, the pushed
end-of-run record and the notification for a successful night, a failed night and a failed
gate, each checked against the run's own summary JSON."""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from pipeline.cli.demo import sample_rows
from pipeline.job import runner
from pipeline.spec import parse_spec
from tests.receiver import Receiver, Request, start_receiver

pytestmark = pytest.mark.usefixtures("ray_session")
DATE = "2026-12-01"
TOKEN = "T0KEN-sekrit-42"  # a webhook token in the notify URL's path: never printed


@pytest.fixture(scope="module")
def receiver() -> Receiver:
    server = start_receiver()
    yield server
    server.stop()


def spec_doc(model: Path, tmp: Path, receiver: Receiver, **over: dict) -> dict:
    doc = {
        "name": "nightly-mon",
        "input": {"uri": str(tmp / "in"), "passthrough_columns": ["source"]},
        "model": {"path": str(model), "max_new_tokens": 3},
        "pruning": {"keep": 16},
        "execution": {"batch_size": 2, "preprocess_batch_size": 2},
        "output": {"uri": str(tmp / "out"), "min_rows_per_file": 2},
        "cost": {"shadow_fraction": 1.0, "usd_per_gpu_hour": 2.0},
        "monitoring": {
            "pushgateway": receiver.url,
            "notify": f"{receiver.url}/services/{TOKEN}?token={TOKEN}",
            "progress_interval_s": 1,
        },
        "gate": {"min_items_per_gpu_hour": 1, "min_shadow_agreement": 0.0},
    }
    for key, value in over.items():
        doc[key] = doc.get(key, {}) | value
    return doc


def summary_json(tmp: Path, doc: dict) -> dict:
    return json.loads((tmp / "out" / "_runs" / f"{doc['run_id']}.json").read_text())


def pushed(requests: list[Request]) -> dict:
    (push,) = [r for r in requests if r.path.startswith("/metrics/")]
    assert (push.method, push.path) == ("POST", "/metrics/job/nightly-mon")
    return push.samples()


def check_record(samples: dict, doc: dict, *, success: bool) -> None:
    """The pushed numbers are the summary's."""
    for status, key in (("ok", "items_ok"), ("error", "items_error"), ("skipped", "items_skipped")):
        assert samples[("resprune_run_items", (("status", status),))] == doc[key]
    hours = doc["gpu_hours"]
    assert hours["used"] == pytest.approx(doc["gpu_seconds"] / 3600)
    assert hours["billed"] == pytest.approx(doc["actor_seconds"] / 3600)
    for kind, value in hours.items():
        got = samples[("resprune_run_gpu_hours", (("kind", kind),))]
        assert math.isnan(got) if value is None else got == pytest.approx(value)
    assert samples[("resprune_run_duration_seconds", ())] == pytest.approx(doc["wall_seconds"])
    assert samples[("resprune_run_success", ())] == int(success)
    last = ("resprune_run_last_success_timestamp_seconds", ())
    assert (last in samples) == success
    if success:
        assert abs(samples[last] - time.time()) < 120


def check_notification(requests: list[Request], doc: dict, what: str) -> None:
    (note,) = [r for r in requests if r.path.startswith("/services/")]
    body = note.json()
    for part in (doc["name"], doc["run_date"], doc["run_id"], what, f"_runs/{doc['run_id']}.json"):
        assert part in body["text"], (part, body["text"])
    assert (body["run_id"], body["status"], body["items_ok"]) == (doc["run_id"], "failed", 0)
    assert body["summary_uri"].endswith(f"/_runs/{doc['run_id']}.json")


class Scraper(threading.Thread):
    """Polls the node's metrics endpoint until the job's live metrics show up."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.port = ray.nodes()[0]["MetricsExportPort"]
        self.found: dict[str, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics").read()
            except OSError:
                text = b""
            self.found = live_metrics(text.decode())
            if {"ray_resprune_items_total", "ray_resprune_visual_tokens_kept_total"} <= set(
                self.found
            ):
                return
            time.sleep(1)


def live_metrics(text: str) -> dict[str, float]:
    """Sum of each resprune series of the job ``nightly-mon`` and run date ``DATE``."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("ray_resprune_") and s.labels.get("job_name") == "nightly-mon":
                assert s.labels.get("run_date") == DATE
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


@pytest.mark.timeout(300)
def test_success_then_failed_night_then_failed_gate(
    tiny_llava: Path, tmp_path: Path, receiver: Receiver, capfd: pytest.CaptureFixture
) -> None:
    rows = sample_rows()  # the demo's images plus its two bad rows
    (tmp_path / "in").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in" / "part-0.parquet")
    receiver.take()

    scraper = Scraper()
    scraper.start()
    spec = parse_spec(spec_doc(tiny_llava, tmp_path, receiver))
    doc = runner.run_job(spec, DATE, progress=False)
    scraper.join(timeout=60)
    scraper.done.set()
    assert doc["status"] == "finished" and doc["gate"]["passed"] is True, doc.get("failure")
    assert doc == summary_json(tmp_path, doc)
    assert (doc["items_ok"], doc["items_error"]) == (len(rows) - 2, 2)
    checks = {c["check"]: c for c in doc["gate"]["checks"]}
    assert checks["all_ids_committed"]["value"] == len(rows)
    assert checks["kept_tokens_within_budget"]["value"] == 16
    assert checks["min_shadow_agreement"]["passed"] is True
    got = receiver.take()
    check_record(pushed(got), doc, success=True)
    assert not [r for r in got if r.path.startswith("/services/")]  # success: no notification
    # live metrics, exported by the answer actors while the run went on
    live = scraper.found
    assert live.get("ray_resprune_items_total") == len(rows), live
    assert live["ray_resprune_visual_tokens_kept_total"] == 16 * (len(rows) - 2)
    assert (
        live["ray_resprune_visual_tokens_in_total"] > live["ray_resprune_visual_tokens_kept_total"]
    )
    err = capfd.readouterr().err
    assert "progress: " in err and f"/{len(rows)} items" in err
    assert "constructor arguments in the object store" not in err

    # a failed night: the error limit (judged over the prefix) fails a rerun with nothing to do
    strict = {"max_error_fraction": 0.0, "error_fraction_min_items": 1}
    spec = parse_spec(spec_doc(tiny_llava, tmp_path, receiver, execution=strict))
    doc = runner.run_job(spec, DATE, progress=False)
    assert doc["status"] == "failed" and "error fraction" in doc["failure"]
    assert doc["gate"]["passed"] is None  # not judged: the night failed already
    got = receiver.take()
    check_record(pushed(got), summary_json(tmp_path, doc), success=False)
    check_notification(got, doc, "error fraction")

    # a failed gate: throughput below its floor
    spec = parse_spec(
        spec_doc(tiny_llava, tmp_path, receiver, gate={"min_items_per_gpu_hour": 1e12})
    )
    doc = runner.run_job(spec, DATE, progress=False)
    assert doc["status"] == "failed" and doc["gate"]["failed"] == ["min_items_per_gpu_hour"]
    assert doc == summary_json(tmp_path, doc)
    got = receiver.take()
    check_record(pushed(got), doc, success=False)
    check_notification(got, doc, "gate failed")
    captured = capfd.readouterr()
    assert TOKEN not in captured.out + captured.err
