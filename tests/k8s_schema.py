"""Offline Kubernetes manifest checks for tests: CRD schemas, strict fields, built-in kinds.

What `kubectl create --validate=strict` would reject, without a cluster: the KubeRay
v1.7.0 CRDs' openAPIV3Schema through jsonschema, plus a walk that reports any field the
schema does not declare (the API server prunes or rejects those; jsonschema alone
allows them). CEL rules (`x-kubernetes-validations`) are not evaluated:
`cel_rules_on` lists the ones that apply to fields a manifest sets. Built-in kinds are
checked against their required fields, and pod templates against the PodTemplateSpec
schema embedded in the RayJob CRD (generated from the same Kubernetes types).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

CRD_DIR = Path(__file__).parent / "data" / "kuberay-crds"
CRD_FILES = {
    "RayJob": "ray.io_rayjobs.yaml",
    "RayCronJob": "ray.io_raycronjobs.yaml",
    "RayCluster": "ray.io_rayclusters.yaml",
}
SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL|PRIVATE", re.IGNORECASE)
OBJECT_META = {"name", "generateName", "namespace", "labels", "annotations"}
BUILTIN = {  # kind -> (apiVersion, allowed top-level keys, required dotted paths)
    "ServiceAccount": ("v1", {"imagePullSecrets", "automountServiceAccountToken"}, []),
    "ConfigMap": ("v1", {"data", "binaryData", "immutable"}, ["data"]),
    "Role": ("rbac.authorization.k8s.io/v1", {"rules"}, ["rules"]),
    "RoleBinding": (
        "rbac.authorization.k8s.io/v1",
        {"roleRef", "subjects"},
        ["roleRef.apiGroup", "roleRef.kind", "roleRef.name", "subjects"],
    ),
    "CronJob": (
        "batch/v1",
        {"spec"},
        ["spec.schedule", "spec.jobTemplate.spec.template.spec.containers"],
    ),
}


@functools.cache
def crd_schema(kind: str) -> dict[str, Any]:
    """openAPIV3Schema of the served v1 version of a KubeRay kind."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the files are 1 MB each
    crd = yaml.load((CRD_DIR / CRD_FILES[kind]).read_text(), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def pod_template_schema() -> dict[str, Any]:
    """The PodTemplateSpec schema (from the RayJob CRD's head group template)."""
    cluster = crd_schema("RayJob")["properties"]["spec"]["properties"]["rayClusterSpec"]
    return cluster["properties"]["headGroupSpec"]["properties"]["template"]


def schema_errors(value: Any, schema: dict[str, Any]) -> list[str]:
    """jsonschema errors (types, enums, patterns, required) with their paths."""
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
        for e in validator.iter_errors(value)
    ]


def unknown_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Paths of fields that `schema` does not declare (strict validation)."""
    if schema.get("x-kubernetes-preserve-unknown-fields") or schema.get(
        "x-kubernetes-int-or-string"
    ):
        return []
    if isinstance(value, list):
        items = schema.get("items", {})
        return [e for i, v in enumerate(value) for e in unknown_fields(v, items, f"{path}[{i}]")]
    if not isinstance(value, dict):
        return []
    props = schema.get("properties", {})
    extra = schema.get("additionalProperties", False)
    found = []
    for key, sub in value.items():
        where = f"{path}.{key}" if path else key
        if key in props:
            found += unknown_fields(sub, props[key], where)
        elif isinstance(extra, dict):
            found += unknown_fields(sub, extra, where)
        elif extra is not True:
            found.append(where)
    return found


def metadata_errors(doc: dict[str, Any]) -> list[str]:
    """Unknown or missing top-level ObjectMeta fields (the CRD schema leaves them open)."""
    meta = doc.get("metadata", {})
    errors = [f"metadata.{key}" for key in meta if key not in OBJECT_META]
    if not (meta.get("name") or meta.get("generateName")):
        errors.append("metadata: needs name or generateName")
    return errors


def crd_problems(doc: dict[str, Any]) -> list[str]:
    """Everything the API server (strict) would reject in a ray.io manifest."""
    schema = crd_schema(doc["kind"])
    body = {k: v for k, v in doc.items() if k != "metadata"}
    strict = [f"unknown field {p}" for p in unknown_fields(body, schema)]
    return schema_errors(doc, schema) + strict + metadata_errors(doc)


def cel_rules_on(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Paths set in `value` whose schema carries CEL rules (not evaluated offline)."""
    found = [path or "(root)"] if "x-kubernetes-validations" in schema else []
    if isinstance(value, list):
        items = schema.get("items", {})
        found += [p for i, v in enumerate(value) for p in cel_rules_on(v, items, f"{path}[{i}]")]
    elif isinstance(value, dict):
        props = schema.get("properties", {})
        for key, sub in value.items():
            if key in props:
                found += cel_rules_on(sub, props[key], f"{path}.{key}" if path else key)
    return found


def _get(doc: dict[str, Any], dotted: str) -> Any:
    node: Any = doc
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def builtin_problems(doc: dict[str, Any]) -> list[str]:
    """Wrong apiVersion, unknown top-level keys and missing required fields of a built-in kind."""
    version, allowed, required = BUILTIN[doc["kind"]]
    problems = [] if doc.get("apiVersion") == version else [f"apiVersion must be {version}"]
    problems += [
        f"unknown field {k}" for k in doc if k not in {"apiVersion", "kind", "metadata"} | allowed
    ]
    problems += metadata_errors(doc)
    problems += [f"missing {path}" for path in required if not _get(doc, path)]
    if doc["kind"] == "Role":
        problems += [f"rule {r} needs verbs" for r in doc["rules"] if not r.get("verbs")]
    if doc["kind"] == "RoleBinding":
        problems += [f"subject {s} needs kind+name" for s in doc["subjects"] if not s.get("name")]
    if doc["kind"] == "ConfigMap":
        problems += [
            f"data.{k} is not a string" for k, v in doc["data"].items() if not isinstance(v, str)
        ]
    if doc["kind"] == "CronJob":
        pod = doc["spec"]["jobTemplate"]["spec"]["template"]
        if pod["spec"].get("restartPolicy") not in {"Never", "OnFailure"}:
            problems.append("a Job's pod restartPolicy must be Never or OnFailure")
        problems += schema_errors(pod, pod_template_schema())
        problems += [f"unknown field {p}" for p in unknown_fields(pod, pod_template_schema())]
    return problems


def env_entries(node: Any) -> list[dict[str, Any]]:
    """Every container `env` entry anywhere under `node`."""
    if isinstance(node, list):
        return [e for item in node for e in env_entries(item)]
    if not isinstance(node, dict):
        return []
    found = list(node["env"]) if isinstance(node.get("env"), list) else []
    return found + [e for v in node.values() for e in env_entries(v)]


def literal_secrets(docs: list[dict[str, Any]]) -> list[str]:
    """Env entries with a credential-like name and a literal value."""
    return [e["name"] for e in env_entries(docs) if SECRET_NAME.search(e["name"]) and "value" in e]
