"""Whole-job checks that need storage but no model weights: is the model path usable, and
is the output prefix outside the input?

A local folder or an ``s3://`` prefix must hold ``config.json`` naming a supported family
(its ``model_type``; the one ``model.family`` asks for, unless ``auto``); a hub id must look
like ``org/name`` (its download and family are checked when the actor loads it); the job's
engine must be installed. An output prefix equal to or inside the input prefix is refused
before any write (the next run would read the results as input). Non-goal: validating the
weights themselves.
"""

from __future__ import annotations

import os
import re
from typing import get_args

from pipeline.io.storage import (
    StorageError,
    exists,
    filesystem,
    filesystem_path,
    is_remote,
    join,
    read_json,
    redact,
)
from pipeline.spec import JobSpec, ModelSpec

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# the families resprune.models has adapters for (a test keeps the two lists equal)
FAMILIES = tuple(f for f in get_args(ModelSpec.model_fields["family"].annotation) if f != "auto")


class ModelPathError(RuntimeError):
    """The model cannot be loaded (missing folder, no config.json, bad hub id, no engine)."""


def check_model_path(spec: JobSpec) -> None:
    """Raise ModelPathError with one clear line when model.path is unusable."""
    path = spec.model.path
    if is_remote(path):
        fs, root = filesystem(path, spec.storage)
        try:
            ok = exists(fs, join(root, "config.json"))
        except OSError as exc:
            raise StorageError(f"model path {path}: {redact(str(exc))}") from None
        if not ok:
            raise ModelPathError(f"model.path {path}: no config.json under this prefix")
        check_family(spec)
        return
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelPathError(f"model.path {path}: folder has no config.json")
        check_family(spec)
        return
    if path.startswith((".", "/", "~")) or not _HUB_ID.match(path):
        raise ModelPathError(f"model.path {path}: no such folder, and not a hub id (org/name)")


def check_family(spec: JobSpec) -> None:
    """Raise ModelPathError with one line when config.json's model_type is not a supported
    family, not the one ``model.family`` names, or one ``engine: vllm`` does not take (under
    the job's position policy)."""
    config = model_config(spec)
    if not config:
        raise ModelPathError(f"model.path {spec.model.path}: config.json is not a JSON object")
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ModelPathError(
            f"model.path {spec.model.path}: unsupported model_type {model_type!r} in "
            f"config.json; supported: {', '.join(FAMILIES)}"
        )
    if spec.model.family not in ("auto", model_type):
        raise ModelPathError(
            f"model.path {spec.model.path}: model.family is {spec.model.family!r} but "
            f"config.json's model_type is {model_type!r}"
        )
    if spec.model.engine == "vllm":  # no vLLM import: the plugin's tables
        from resprune.engines.vllm_plugin import vllm_refusal

        refusal = vllm_refusal(model_type, spec.pruning.position_policy)
        if refusal:
            raise ModelPathError(f"model.path {spec.model.path}: {refusal}")


def check_output_outside_input(spec: JobSpec) -> None:
    """Raise StorageError (one line) when output.uri is input.uri or inside it."""
    inp, out = spec.input.uri, spec.output.uri
    if is_remote(inp) != is_remote(out):
        return
    base = filesystem_path(inp)
    if any(c in base for c in "*?["):  # a glob: the folder before its first pattern
        base = base[: min(base.find(c) for c in "*?[" if c in base)].rsplit("/", 1)[0]
    root = filesystem_path(out)
    if not is_remote(inp):
        base, root = os.path.realpath(base), os.path.realpath(root)
    if root == base or root.startswith(base.rstrip("/") + "/"):
        raise StorageError(
            f"output.uri {redact(out)} is inside input.uri {redact(inp)}: the next run would "
            "read the results as input; write them outside the input prefix"
        )


def check_engine(spec: JobSpec) -> None:
    """Raise ModelPathError with one clear line when model.engine is not installed here (or
    is a vLLM release the plugin does not support), or cannot take the checkpoint's family
    under the job's position policy (the family read from config.json of a folder or S3
    prefix)."""
    from resprune.engines import engine_problem
    from resprune.engines.vllm_plugin import vllm_refusal, vllm_version_problem

    problem = engine_problem(spec.model.engine)
    if problem:
        raise ModelPathError(problem)
    if spec.model.engine != "vllm":
        return
    problem = vllm_version_problem()
    if problem:
        raise ModelPathError(problem)
    family = spec.model.family if spec.model.family != "auto" else _model_type(spec)
    refusal = vllm_refusal(family, spec.pruning.position_policy) if family else None
    if refusal:
        raise ModelPathError(f"model.path {spec.model.path}: {refusal}")


def _model_type(spec: JobSpec) -> str | None:
    """config.json's model_type for a folder or S3 prefix; None for hub ids or unreadable."""
    return model_config(spec).get("model_type")


def model_config(spec: JobSpec) -> dict:
    """config.json of a model folder or S3 prefix; {} for hub ids or when unreadable."""
    path = spec.model.path
    if not (is_remote(path) or os.path.isdir(path)):
        return {}
    try:
        fs, root = filesystem(path, spec.storage)
        config = read_json(fs, join(root, "config.json"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}
