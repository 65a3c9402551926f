"""Render the `RayJob` (KubeRay v1) that runs one night of a job spec on a fresh cluster.

Plain dicts in, plain dicts out: the caller writes YAML. The cluster has a head that runs
no tasks (`num-cpus: "0"`), a CPU group for decoding and a GPU group for the model
actors, both scaling from zero with the in-tree autoscaler, and is deleted after the job.
The control plane is closed: token auth on, the head Service is ClusterIP, no Ingress,
and the operator's NetworkPolicy when the settings ask for it. S3 credentials come from
a Secret by `secretKeyRef` or from pod identity; no value is ever written here.
Non-goals: no Kueue, no GCS fault tolerance, no standing clusters (`clusterSelector`).
"""

from __future__ import annotations

import math
import shlex
from pathlib import PurePosixPath
from typing import Any

from pipeline.k8s.settings import DeployError, DeploySettings, PodSize, cpu_cores, memory_bytes
from pipeline.spec import JobSpec

RAY_UID = 1000  # the non-root user of infra/Dockerfile
OBJECT_STORE_FRACTION = 0.3  # Ray's default object store share of the pod memory
MAX_RAYJOB_NAME = 47  # KubeRay: RayCluster name limit (53) minus the 6 characters it appends
S3_ENV = (  # (variable, required): keys of the S3 Secret
    ("AWS_ACCESS_KEY_ID", True),
    ("AWS_SECRET_ACCESS_KEY", True),
    ("AWS_SESSION_TOKEN", False),
    ("AWS_ENDPOINT_URL", False),
    ("AWS_REGION", False),
)


def entrypoint(deploy: DeploySettings, spec_path: str, run_date: str | None) -> str:
    """`python -m pipeline run <spec in the image> [--run-date D]` (no date: today, UTC)."""
    relative = PurePosixPath(spec_path)
    if relative.is_absolute() or ".." in relative.parts:
        raise DeployError(f"job spec path must be relative to the repo root, got {spec_path!r}")
    words = ["python", "-m", "pipeline", "run", str(PurePosixPath(deploy.workdir) / relative)]
    if run_date is not None:
        words += ["--run-date", run_date]
    return shlex.join(words)


def gpu_max_replicas(spec: JobSpec, deploy: DeploySettings) -> int:
    """GPU pods needed for the spec's largest actor count."""
    if spec.execution.gpus_per_actor <= 0:
        raise DeployError("execution.gpus_per_actor is 0: render-k8s deploys GPU actors only")
    actors = spec.execution.actors
    most = actors if isinstance(actors, int) else actors[1]
    per_pod = deploy.gpu_workers.gpus_per_pod / spec.execution.gpus_per_actor
    if per_pod < 1:
        raise DeployError(
            f"gpus_per_actor {spec.execution.gpus_per_actor} > gpu_workers.gpus_per_pod "
            f"{deploy.gpu_workers.gpus_per_pod}: an actor would not fit on a GPU pod"
        )
    needed_cpus = math.floor(per_pod) * spec.execution.cpus_per_actor
    if needed_cpus > cpu_cores(deploy.gpu_workers.cpu):
        raise DeployError(
            f"gpu_workers.cpu {deploy.gpu_workers.cpu} < {needed_cpus} "
            f"(actors per pod x execution.cpus_per_actor)"
        )
    return math.ceil(most / math.floor(per_pod))


def _env(deploy: DeploySettings) -> list[dict[str, Any]]:
    if deploy.s3_secret is None:
        return []
    return [
        {
            "name": name,
            "valueFrom": {
                "secretKeyRef": {"name": deploy.s3_secret, "key": name, "optional": not required}
            },
        }
        for name, required in S3_ENV
    ]


def _shm(size: PodSize) -> str:
    # Ray puts its object store on /dev/shm only when it is large enough, else on /tmp (slow).
    return f"{int(memory_bytes(size.memory) * OBJECT_STORE_FRACTION) // 2**20}Mi"


def _pod_template(
    deploy: DeploySettings, size: PodSize, container: str, gpus: int = 0
) -> dict[str, Any]:
    amounts = {"cpu": size.cpu, "memory": size.memory}
    if gpus:
        amounts["nvidia.com/gpu"] = str(gpus)
    box: dict[str, Any] = {
        "name": container,
        "image": deploy.image,
        "imagePullPolicy": "IfNotPresent",
        "resources": {"requests": dict(amounts), "limits": dict(amounts)},
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if env := _env(deploy):
        box["env"] = env
    pod: dict[str, Any] = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": RAY_UID, "runAsGroup": RAY_UID},
        "containers": [box],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": _shm(size)}}],
    }
    if deploy.service_account:
        pod["serviceAccountName"] = deploy.service_account
    if size.node_selector:
        pod["nodeSelector"] = dict(size.node_selector)
    if gpus:
        pod["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    return {"spec": pod}


def ray_cluster_spec(spec: JobSpec, deploy: DeploySettings) -> dict[str, Any]:
    """The `rayClusterSpec`: closed head, CPU and GPU groups from zero, autoscaler v2."""
    cluster: dict[str, Any] = {
        "rayVersion": deploy.ray_version,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {
            "version": "v2",
            "upscalingMode": "Default",
            "idleTimeoutSeconds": deploy.idle_timeout_seconds,
        },
        "authOptions": {"mode": "token"},
        "headGroupSpec": {
            "serviceType": "ClusterIP",
            "enableIngress": False,
            "rayStartParams": {"num-cpus": "0"},
            "template": _pod_template(deploy, deploy.head, "ray-head"),
        },
        "workerGroupSpecs": [
            {
                "groupName": "cpu-decode",
                "replicas": 0,
                "minReplicas": 0,
                "maxReplicas": deploy.cpu_workers.max_replicas,
                "rayStartParams": {},
                "template": _pod_template(deploy, deploy.cpu_workers, "ray-worker"),
            },
            {
                "groupName": "gpu",
                "replicas": 0,
                "minReplicas": 0,
                "maxReplicas": gpu_max_replicas(spec, deploy),
                "rayStartParams": {},
                "template": _pod_template(
                    deploy, deploy.gpu_workers, "ray-worker", deploy.gpu_workers.gpus_per_pod
                ),
            },
        ],
    }
    if deploy.network_policy:
        cluster["networkPolicy"] = {"mode": deploy.network_policy}
    return cluster


def rayjob_spec(
    spec: JobSpec, deploy: DeploySettings, spec_path: str, run_date: str | None = None
) -> dict[str, Any]:
    """The RayJob `spec` (also the RayCronJob's `jobTemplate`)."""
    return {
        "entrypoint": entrypoint(deploy, spec_path, run_date),
        "submissionMode": "K8sJobMode",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": deploy.ttl_seconds_after_finished,
        "activeDeadlineSeconds": deploy.active_deadline_seconds,
        "preRunningDeadlineSeconds": deploy.pre_running_deadline_seconds,
        "backoffLimit": deploy.backoff_limit,
        "submitterConfig": {"backoffLimit": deploy.submitter_backoff_limit},
        "rayClusterSpec": ray_cluster_spec(spec, deploy),
    }


def labels(spec: JobSpec) -> dict[str, str]:
    """Labels shared by every object rendered for a job spec."""
    return {"app.kubernetes.io/name": "resprune-pipeline", "app.kubernetes.io/instance": spec.name}


def render_rayjob(
    spec: JobSpec,
    deploy: DeploySettings,
    spec_path: str,
    *,
    run_date: str | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """A RayJob: named `name` if given, else `generateName: <spec.name>-` (use `kubectl create`)."""
    metadata: dict[str, Any] = {"namespace": deploy.namespace, "labels": labels(spec)}
    longest = name if name is not None else spec.name + "-xxxxx"
    if len(longest) > MAX_RAYJOB_NAME or not longest[0].isalpha():
        raise DeployError(
            f"RayJob name {longest!r}: KubeRay needs a DNS-1035 label of at most "
            f"{MAX_RAYJOB_NAME} characters; shorten the job spec's name"
        )
    if name is None:
        metadata = {"generateName": spec.name + "-", **metadata}
    else:
        metadata = {"name": name, **metadata}
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": metadata,
        "spec": rayjob_spec(spec, deploy, spec_path, run_date),
    }
