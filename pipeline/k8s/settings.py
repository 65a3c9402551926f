"""Deployment settings for `render-k8s`: what the job spec does not know about the cluster.

The job spec (`jobs/*.yaml`) says what to run (model, actors, GPUs per actor, output);
these settings say where and when (image, namespace, schedule, pod sizes, deadlines,
where S3 credentials come from). They live in `infra/deploy.yaml`, parsed once here
with `extra="forbid"`. Non-goals: no secret values ever (only the *name* of a
Kubernetes Secret), no cluster discovery, no defaults guessed from the spec.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$"


class DeployError(ValueError):
    """Deployment settings that cannot be rendered; the message lists every problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PodSize(_Strict):
    cpu: str = Field(pattern=QUANTITY, description="CPU request = limit (Kubernetes quantity).")
    memory: str = Field(pattern=QUANTITY, description="Memory request = limit (e.g. 64Gi).")
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="nodeSelector of the pods (cluster-specific pool labels)."
    )


class CpuWorkers(PodSize):
    max_replicas: int = Field(8, ge=1, description="Upper bound of CPU (decode) worker pods.")


class GpuWorkers(PodSize):
    gpus_per_pod: int = Field(1, ge=1, description="nvidia.com/gpu per GPU worker pod.")


class DeploySettings(_Strict):
    namespace: str = Field(
        "ray-jobs",
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="Namespace of all objects.",
    )
    image: str = Field(description="Pipeline image built from infra/Dockerfile (pin a digest).")
    workdir: str = Field(
        "/app",
        pattern=r"^/",
        description="Folder of the repo inside the image (Dockerfile WORKDIR).",
    )
    ray_version: str = Field("2.60.0", description="Ray version in the image; KubeRay needs it.")
    schedule: str = Field("0 1 * * *", description="Cron schedule of the nightly run.")
    time_zone: str = Field("Etc/UTC", description="IANA time zone of the schedule.")
    s3_secret: str | None = Field(
        "caption-s3",
        description="Secret holding AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (optional "
        "AWS_ENDPOINT_URL, AWS_REGION); null means node/pod identity (IRSA, workload identity).",
    )
    service_account: str | None = Field(
        None, description="ServiceAccount of the Ray pods (for pod identity); null: KubeRay's."
    )
    network_policy: Literal["DenyAllIngress", "DenyAll"] | None = Field(
        "DenyAllIngress",
        description="KubeRay networkPolicy mode (RayClusterNetworkPolicy gate); null: off.",
    )
    head: PodSize = Field(default_factory=lambda: PodSize(cpu="4", memory="16Gi"))
    cpu_workers: CpuWorkers = Field(default_factory=lambda: CpuWorkers(cpu="16", memory="64Gi"))
    gpu_workers: GpuWorkers = Field(default_factory=lambda: GpuWorkers(cpu="12", memory="96Gi"))
    idle_timeout_seconds: int = Field(
        120, ge=1, description="Autoscaler removes idle workers after."
    )
    ttl_seconds_after_finished: int = Field(
        3600, ge=0, description="Keep the finished cluster for."
    )
    active_deadline_seconds: int = Field(21600, ge=1, description="Whole RayJob deadline.")
    pre_running_deadline_seconds: int = Field(1800, ge=1, description="Deadline to reach Running.")
    backoff_limit: int = Field(1, ge=0, description="Retries of the RayJob, each on a new cluster.")
    submitter_backoff_limit: int = Field(2, ge=0, description="Retries of the submitter pod.")
    launcher_image: str = Field(
        "docker.io/alpine/k8s:1.34.2",
        description="CronJob fallback image: needs sh, sed, date and kubectl (pin a digest).",
    )

    @model_validator(mode="after")
    def _schedule(self) -> DeploySettings:
        if len(self.schedule.split()) != 5:
            raise ValueError(f"schedule must have 5 cron fields, got {self.schedule!r}")
        try:
            ZoneInfo(self.time_zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"time_zone {self.time_zone!r} is not an IANA time zone") from None
        return self


def load_deploy(path: str | Path) -> DeploySettings:
    """Parse deployment settings from YAML; all errors are reported in one DeployError."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DeployError(f"{path}: cannot read deployment settings: {exc}") from exc
    try:
        return DeploySettings.model_validate(raw or {})
    except ValidationError as exc:
        lines = [f"{path}: {exc.error_count()} problem(s) in the deployment settings:"]
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  - {where}: {err['msg']}")
        raise DeployError("\n".join(lines)) from None


def latest_utc_finish(deploy: DeploySettings) -> dt.timedelta | None:
    """Worst-case end of a night's run after UTC midnight of its start day, or None.

    Without `--run-date` the job takes today's UTC date when its driver starts, so a
    retry must not start after UTC midnight. Only fixed `M H * * *` schedules are checked.
    """
    minute, hour, *rest = deploy.schedule.split()
    if not (minute.isdigit() and hour.isdigit()) or rest != ["*", "*", "*"]:
        return None
    zone = ZoneInfo(deploy.time_zone)
    budget = deploy.pre_running_deadline_seconds + deploy.active_deadline_seconds
    worst = dt.timedelta(0)
    for month in range(1, 13):  # both sides of any DST change
        local = dt.datetime(2026, month, 1, int(hour), int(minute), tzinfo=zone)
        start = local.astimezone(dt.UTC)
        midnight = start.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + dt.timedelta(seconds=budget * (deploy.backoff_limit + 1))
        worst = max(worst, end - midnight)
    return worst


def check_same_utc_day(deploy: DeploySettings) -> None:
    """Raise DeployError when a scheduled run and its retries could cross UTC midnight."""
    worst = latest_utc_finish(deploy)
    if worst is not None and worst > dt.timedelta(days=1):
        raise DeployError(
            f"schedule {deploy.schedule!r} ({deploy.time_zone}) plus (backoff_limit + 1) x "
            f"(pre_running + active deadline) can end {worst} after UTC midnight: a retry "
            "would take the next run date. Schedule earlier (UTC) or shorten the deadlines."
        )


def memory_bytes(quantity: str) -> int:
    """Bytes of a Kubernetes memory quantity ("16Gi", "512M", "1000")."""
    units = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    units |= {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"([0-9.]+)(|k|M|G|T|Ki|Mi|Gi|Ti)", quantity)
    if not match:
        raise DeployError(f"not a memory quantity: {quantity!r}")
    return int(float(match.group(1)) * units[match.group(2)])


def cpu_cores(quantity: str) -> float:
    """CPU cores of a Kubernetes CPU quantity ("500m" -> 0.5, "12" -> 12.0)."""
    match = re.fullmatch(r"([0-9.]+)(m?)", quantity)
    if not match:
        raise DeployError(f"not a CPU quantity: {quantity!r}")
    value = float(match.group(1))
    return value / 1000 if match.group(2) else value
