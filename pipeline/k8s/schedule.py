"""Render the nightly schedulers: a KubeRay `RayCronJob` and a plain `CronJob` fallback.

RayCronJob (KubeRay >= 1.6, alpha, `RayCronJob` feature gate) copies a static RayJob
spec each night, so its entrypoint has no `--run-date`: the job takes today's UTC date
when its driver starts (`check_same_utc_day` keeps retries on the same date).

The fallback is for operators without that gate: a CronJob (`concurrencyPolicy: Forbid`)
whose pod fills the night's UTC date into a RayJob template held in a ConfigMap, runs
`kubectl create`, then follows the RayJob to its end, so Forbid covers the whole night
and the CronJob's history shows failed nights. The date-suffixed name makes a second
launch on the same night follow the existing RayJob instead of starting another.
Non-goals: no Argo/Airflow, no standing clusters, no catch-up of missed nights.
"""

from __future__ import annotations

from typing import Any

from pipeline.k8s.rayjob import labels, rayjob_spec, render_rayjob
from pipeline.k8s.settings import DeployError, DeploySettings
from pipeline.spec import JobSpec

RUN_DATE_PLACEHOLDER = "__RUN_DATE__"
TEMPLATE_DIR = "/etc/rayjob"
TEMPLATE_KEY = "rayjob.yaml"
MAX_CRON_NAME = 41  # RayCronJob appends "-" + 5 characters to make a RayJob name (<= 47)

LAUNCHER_SCRIPT = """\
set -eu
RUN_DATE="${RUN_DATE:-$(date -u +%Y-%m-%d)}"
NAME="${JOB_NAME}-${RUN_DATE}"
sed "s/__RUN_DATE__/${RUN_DATE}/g" "${RAYJOB_TEMPLATE}" > /tmp/rayjob.yaml
if kubectl get rayjob "${NAME}" > /dev/null 2>&1; then
  echo "RayJob ${NAME} already exists: following it"
else
  kubectl create -f /tmp/rayjob.yaml
fi
while :; do
  STATE="$(kubectl get rayjob "${NAME}" -o 'jsonpath={.status.jobDeploymentStatus}')"
  case "${STATE}" in
    Complete) break ;;
    Failed|ValidationFailed) echo "RayJob ${NAME}: ${STATE}" >&2; exit 1 ;;
  esac
  sleep "${POLL_SECONDS:-60}"
done
STATUS="$(kubectl get rayjob "${NAME}" -o 'jsonpath={.status.jobStatus}')"
echo "RayJob ${NAME}: ${STATUS}"
test "${STATUS}" = SUCCEEDED
"""


def render_raycronjob(spec: JobSpec, deploy: DeploySettings, spec_path: str) -> dict[str, Any]:
    """The RayCronJob: schedule, time zone and the RayJob spec as `jobTemplate`."""
    if len(spec.name) > MAX_CRON_NAME:
        raise DeployError(f"job name {spec.name!r} is over {MAX_CRON_NAME} characters (RayCronJob)")
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCronJob",
        "metadata": {"name": spec.name, "namespace": deploy.namespace, "labels": labels(spec)},
        "spec": {
            "schedule": deploy.schedule,
            "timeZone": deploy.time_zone,
            "jobTemplate": rayjob_spec(spec, deploy, spec_path),
        },
    }


def launcher_name(spec: JobSpec) -> str:
    """Name of the fallback's ServiceAccount, Role and RoleBinding."""
    return f"{spec.name}-launcher"


def rayjob_template(spec: JobSpec, deploy: DeploySettings, spec_path: str) -> dict[str, Any]:
    """The RayJob of one night with the date left as a placeholder (ConfigMap content)."""
    return render_rayjob(
        spec,
        deploy,
        spec_path,
        run_date=RUN_DATE_PLACEHOLDER,
        name=f"{spec.name}-{RUN_DATE_PLACEHOLDER}",
    )


def render_rbac(spec: JobSpec, deploy: DeploySettings) -> list[dict[str, Any]]:
    """ServiceAccount, Role (create/get rayjobs, nothing else) and RoleBinding of the launcher."""
    meta = {"name": launcher_name(spec), "namespace": deploy.namespace, "labels": labels(spec)}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": dict(meta)},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": dict(meta),
            "rules": [
                {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get"]}
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": dict(meta),
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": launcher_name(spec),
            },
            "subjects": [
                {
                    "kind": "ServiceAccount",
                    "name": launcher_name(spec),
                    "namespace": deploy.namespace,
                }
            ],
        },
    ]


def _launcher_pod(spec: JobSpec, deploy: DeploySettings, config_map: str) -> dict[str, Any]:
    env = {
        "JOB_NAME": spec.name,
        "RAYJOB_TEMPLATE": f"{TEMPLATE_DIR}/{TEMPLATE_KEY}",
        "HOME": "/tmp",
    }
    return {
        "serviceAccountName": launcher_name(spec),
        "restartPolicy": "Never",
        "securityContext": {"runAsNonRoot": True, "runAsUser": 65534, "runAsGroup": 65534},
        "containers": [
            {
                "name": "create-rayjob",
                "image": deploy.launcher_image,
                "command": ["/bin/sh", "-c", LAUNCHER_SCRIPT],
                "env": [{"name": k, "value": v} for k, v in env.items()],
                "resources": {
                    "requests": {"cpu": "50m", "memory": "64Mi"},
                    "limits": {"cpu": "200m", "memory": "128Mi"},
                },
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"]},
                },
                "volumeMounts": [{"name": "rayjob", "mountPath": TEMPLATE_DIR, "readOnly": True}],
            }
        ],
        "volumes": [{"name": "rayjob", "configMap": {"name": config_map}}],
    }


def render_cronjob(
    spec: JobSpec, deploy: DeploySettings, template_yaml: str
) -> list[dict[str, Any]]:
    """The fallback: ConfigMap with the RayJob template, then the CronJob that launches it."""
    config_map = f"{spec.name}-rayjob"
    meta = {"namespace": deploy.namespace, "labels": labels(spec)}
    # The launcher follows the RayJob, so it may live as long as the RayJob's deadlines.
    follow = deploy.pre_running_deadline_seconds + deploy.active_deadline_seconds
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": config_map, **meta},
            "data": {TEMPLATE_KEY: template_yaml},
        },
        {
            "apiVersion": "batch/v1",
            "kind": "CronJob",
            "metadata": {"name": spec.name, **meta},
            "spec": {
                "schedule": deploy.schedule,
                "timeZone": deploy.time_zone,
                "concurrencyPolicy": "Forbid",
                "startingDeadlineSeconds": 3600,
                "successfulJobsHistoryLimit": 3,
                "failedJobsHistoryLimit": 5,
                "jobTemplate": {
                    "metadata": {"labels": labels(spec)},
                    "spec": {
                        "backoffLimit": 2,
                        "activeDeadlineSeconds": follow * (deploy.backoff_limit + 1) + 600,
                        "ttlSecondsAfterFinished": 7 * 86400,
                        "template": {
                            "metadata": {"labels": labels(spec)},
                            "spec": _launcher_pod(spec, deploy, config_map),
                        },
                    },
                },
            },
        },
    ]
