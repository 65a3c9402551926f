"""Monitoring without Ray: the gate's checks, the pushed record and the notification on a
loopback server (and when they are down), URLs never printed whole, progress lines, the
stderr filter, and the dashboard and alert rules naming only metrics the job exports."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import yaml

from pipeline.monitoring import gate, notify, record
from pipeline.monitoring.metrics import exported_names
from pipeline.monitoring.progress import duration, line
from pipeline.monitoring.urls import safe_url, scrub
from pipeline.spec import parse_spec
from tests.receiver import Receiver, start_receiver

INFRA = Path(__file__).resolve().parent.parent / "infra" / "monitoring"
SECRET = "xoxb-sekrit-9"
# metrics of Ray, KubeRay and Prometheus itself the rules may name besides ours
OTHERS = {"kuberay_job_deployment_status"}
PROMQL_WORDS = {
    "sum",
    "max",
    "min",
    "avg",
    "count",
    "rate",
    "increase",
    "by",
    "on",
    "and",
    "or",
    "unless",
    "without",
    "ignoring",
    "group_left",
    "group_right",
    "histogram_quantile",
    "time",
    "absent",
    "le",
    "bool",
    "offset",
    "humanizePercentage",
    "label_values",
}


@pytest.fixture(scope="module")
def receiver() -> Receiver:
    server = start_receiver()
    yield server
    server.stop()


def spec(**over: dict):
    doc = {
        "name": "gated",
        "input": {"uri": "/in"},
        "model": {"path": "/m"},
        "output": {"uri": "/out"},
        "gate": {"min_items_per_gpu_hour": 100, "min_shadow_agreement": 0.5},
    }
    for key, value in over.items():
        doc[key] = doc.get(key, {}) | value
    return parse_spec(doc)


def summary(**over) -> dict:
    doc = {
        "name": "gated",
        "run_id": "gated-2026-12-01-x",
        "run_date": "2026-12-01",
        "status": "finished",
        "items_total": 10,
        "items_processed": 6,
        "items_skipped": 4,
        "items_ok": 5,
        "items_error": 1,
        "unreadable_shards": {},
        "gpu_seconds": 36.0,
        "actor_seconds": 72.0,
        "wall_seconds": 90.5,
        "gpu_hours": {"used": 0.01, "billed": 0.02, "unpruned_est": None, "saved": 0.004},
    }
    return doc | over


def report(**over) -> dict:
    doc = {
        "items_ok": 9,
        "items_error": 1,
        "gpu_hours_billed": 0.05,  # 200 items per hour
        "answer_agreement": {"exact_match": 0.4, "token_f1": 0.7, "n": 8},
        "profile": {"kept_tokens_mean": 64.0, "visual_tokens_mean": 576.0},
    }
    return doc | over


def by_name(verdict: dict) -> dict:
    return {c["check"]: c["passed"] for c in verdict["checks"]}


def test_gate_passes_and_fails_each_check() -> None:
    ok = gate.judge(spec(), summary(), report())
    assert ok["passed"] and set(by_name(ok).values()) == {True}
    bad = gate.judge(
        spec(gate={"agreement": "exact_match", "min_items_per_gpu_hour": 201}),
        summary(items_processed=5),
        report(profile={"kept_tokens_mean": 64.5, "visual_tokens_mean": 576.0}),
    )
    assert bad["failed"] == [
        "all_ids_committed",
        "min_items_per_gpu_hour",
        "min_shadow_agreement",
        "kept_tokens_within_budget",
    ]
    line_ = gate.failure_line(bad)
    assert "9 of 10 input ids" in line_ and "200.0 items per GPU hour" in line_
    assert "exact_match 0.400 over 8" in line_ and "kept tokens mean 64.50" in line_


def test_gate_budgets_and_missing_data() -> None:
    # a fraction keeps keep x visual tokens (each image rounded), an energy budget its max
    frac = spec(pruning={"keep": 0.25})
    mean = {"kept_tokens_mean": 144.4, "visual_tokens_mean": 576.0}
    assert gate.judge(frac, summary(), report(profile=mean))["passed"]
    mean["kept_tokens_mean"] = 145.0
    assert not gate.judge(frac, summary(), report(profile=mean))["passed"]
    energy = spec(pruning={"keep": {"energy": 0.9, "max": 100}})
    assert gate.judge(energy, summary(), report(profile={"kept_tokens_mean": 100.0}))["passed"]
    # no shadow items, no billed hours: not judged, not failed; an unreadable prefix fails
    empty = report(answer_agreement={"exact_match": None, "token_f1": None, "n": 0})
    verdict = gate.judge(spec(), summary(), empty | {"gpu_hours_billed": None})
    assert verdict["passed"] and by_name(verdict)["min_shadow_agreement"] is None
    assert by_name(verdict)["min_items_per_gpu_hour"] is None
    assert gate.judge(spec(), summary(), None)["failed"] == [
        "min_items_per_gpu_hour",
        "min_shadow_agreement",
        "kept_tokens_within_budget",
    ]


def test_record_pushed_in_text_format(receiver: Receiver) -> None:
    receiver.take()
    doc = summary()
    assert record.push(receiver.url, "gated", record.registry(doc, finished_at=1.8e9))
    (req,) = receiver.take()
    assert (req.method, req.path) == ("POST", "/metrics/job/gated")
    assert req.headers["Content-Type"].startswith("text/plain")
    got = req.samples()
    assert got[("resprune_run_items", (("status", "skipped"),))] == 4
    assert got[("resprune_run_gpu_hours", (("kind", "billed"),))] == 0.02
    assert math.isnan(got[("resprune_run_gpu_hours", (("kind", "unpruned_est"),))])
    assert got[("resprune_run_duration_seconds", ())] == 90.5
    assert got[("resprune_run_success", ())] == 1
    assert got[("resprune_run_last_success_timestamp_seconds", ())] == 1.8e9
    failed = record.registry(summary(status="failed"), finished_at=1.8e9)
    assert record.push(receiver.url, "gated", failed)
    got = receiver.take()[0].samples()
    assert got[("resprune_run_success", ())] == 0
    assert ("resprune_run_last_success_timestamp_seconds", ()) not in got


def test_notification_body(receiver: Receiver) -> None:
    receiver.take()
    body = notify.message(summary(status="failed"), what="gate failed: x", summary_uri="s3://b/_r")
    assert notify.send(f"{receiver.url}/hooks/{SECRET}", body)
    (req,) = receiver.take()
    got = req.json()
    assert req.path == f"/hooks/{SECRET}" and req.headers["Content-Type"] == "application/json"
    for part in ("gated", "2026-12-01", "gated-2026-12-01-x", "gate failed: x", "s3://b/_r"):
        assert part in got["text"]
    assert (got["items_ok"], got["status"], got["failure"]) == (5, "failed", "gate failed: x")


def test_down_endpoints_cost_one_line_without_secrets(capfd: pytest.CaptureFixture) -> None:
    from tests.s3server import free_port

    dead = f"http://user:{SECRET}@127.0.0.1:{free_port()}/gw/{SECRET}?token={SECRET}"
    assert not record.push(dead, "gated", record.registry(summary(), finished_at=0))
    assert not notify.send(dead.replace(f"user:{SECRET}@", ""), {"text": "x"})
    err = capfd.readouterr().err
    assert len(err.strip().splitlines()) == 2 and err.count("warning: ") == 2
    assert SECRET not in err and "127.0.0.1" in err


def test_urls_are_printed_without_secrets() -> None:
    url = f"https://u:{SECRET}@hooks.example.com:8443/services/T0/{SECRET}?token={SECRET}"
    assert safe_url(url) == "https://hooks.example.com:8443/…"
    assert safe_url("http://gw:9091") == "http://gw:9091"
    text = scrub(f"cannot POST {url}: refused (path /services/T0/{SECRET})", url)
    assert SECRET not in text


def test_progress_line() -> None:
    assert line(30, 120, 2, 15.0) == (
        "progress: 30/120 items (25.0%), 2.00 items/s, ETA 45s, 2 errors so far"
    )
    assert line(0, 10, 0, 60.0).endswith("0.00 items/s, ETA unknown, 0 errors so far")
    assert "ETA 0s, 1 error so far" in line(10, 10, 1, 5.0)
    assert (duration(3725), duration(754), duration(9)) == ("1h02m", "12m34s", "9s")


def test_stderr_filter_drops_only_the_advisory(capfd: pytest.CaptureFixture) -> None:
    from pipeline.monitoring.stderr_filter import drop_lines

    advisory = (
        b"[2026-12-01 03:00:00,000 E 1 1] core_worker.cc:2146: Actor with class name: 'M' "
        b"has constructor arguments in the object store and max_restarts > 0. If ...\n"
    )
    lost = (
        b"(raylet) Task MapWorker(MapBatches(Answerer)).submit failed. There are infinite "
        b"retries remaining, so the task will be retried. Error: The actor is temporarily "
        b"unavailable: RpcError [repeated 3x across cluster]\n"
        b"(raylet) The node with node id: 6e13 and address: 10.0.0.7 has been marked dead "
        b"because the detector has missed too many heartbeats from it. (1) raylet crashes\n"
        b"\t(2) raylet has lagging heartbeats due to slow network or busy workload.\n"
    )
    with drop_lines():
        os.write(2, b"kept before\n" + advisory + lost + b"kept after\n")
        os.write(2, b"\rbar 50%")  # a progress bar's partial line goes through at once
    os.write(2, advisory)  # outside the block nothing is filtered
    err = capfd.readouterr().err
    assert err.startswith("kept before\nkept after\n\rbar 50%")
    assert err.count("constructor arguments") == 1


def promql_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers not followed by '(' or used as a
    label, function, keyword or duration."""
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values and strings
    expr = re.sub(r"\{[^}]*\}", "{}", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "[]", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    names = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b(?!\s*\()", expr))
    return {n for n in names if n not in PROMQL_WORDS and not re.fullmatch(r"e\d*", n)}


def test_dashboard_and_rules_name_only_exported_metrics() -> None:
    dashboard = json.loads((INFRA / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    rules = yaml.safe_load((INFRA / "prometheus-rules.yaml").read_text())
    alerts = [r for g in rules["spec"]["groups"] for r in g["rules"]]
    assert rules["kind"] == "PrometheusRule" and len(alerts) >= 4
    exprs += [str(r["expr"]) for r in alerts]
    known = exported_names() | record.EXPORTED | OTHERS
    named = set().union(*(promql_names(e) for e in exprs))
    assert named <= known, named - known
    for needed in ("ray_resprune_visual_tokens_kept_total", "resprune_run_gpu_hours"):
        assert needed in named
    assert {"kuberay_job_deployment_status", "resprune_run_last_success_timestamp_seconds"} <= {
        n for r in alerts for n in promql_names(str(r["expr"]))
    }
    assert promql_names('sum by (le) (rate(x_bucket{a="b"}[5m])) * 1e3 + y') == {"x_bucket", "y"}


def test_a_night_refused_before_any_model_still_reports(tmp_path: Path, receiver: Receiver) -> None:
    """A whole-job problem (here the model path) ends the run before Ray: the record says
    success 0 with nothing done, and the notification names the cause (no summary written)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.job import runner
    from pipeline.job.checks import ModelPathError

    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": ["a"], "image": [b"x"]}), tmp_path / "in" / "p.parquet")
    doc = {
        "name": "refused",
        "input": {"uri": str(tmp_path / "in")},
        "model": {"path": str(tmp_path / "no-model")},
        "output": {"uri": str(tmp_path / "out")},
        "monitoring": {"pushgateway": receiver.url, "notify": f"{receiver.url}/hook/{SECRET}"},
        "gate": {},
    }
    receiver.take()
    with pytest.raises(ModelPathError):
        runner.run_job(parse_spec(doc), "2026-12-02", progress=False)
    got = {r.path: r for r in receiver.take()}
    samples = got["/metrics/job/refused"].samples()
    assert samples[("resprune_run_success", ())] == 0
    assert samples[("resprune_run_items", (("status", "ok"),))] == 0
    body = got[f"/hook/{SECRET}"].json()
    assert body["text"].startswith(":rotating_light: resprune job refused night 2026-12-02")
    assert "ModelPathError" in body["failure"] and "no summary written" in body["text"]
    assert body["summary_uri"] is None
