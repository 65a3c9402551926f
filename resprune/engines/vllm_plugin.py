"""The ``vllm.general_plugins`` entry point: registers the pruned-embedding model classes.

vLLM calls ``register`` in every process it starts, before it resolves a model class. Kept
free of vLLM imports at module level so that loading the entry point costs nothing, and so
that spec checks can ask which families the vLLM engine takes without importing vLLM.
"""

from __future__ import annotations

ARCHITECTURES = {
    "llava": "ResPruneLlavaForConditionalGeneration",
    "llava_next": "ResPruneLlavaNextForConditionalGeneration",
}
_CLASSES = {
    "llava": "resprune.engines.vllm_models:PrunedLlava",
    "llava_next": "resprune.engines.vllm_models:PrunedLlavaNext",
}


def register() -> None:
    """Register each family's class under its own architecture name (idempotent)."""
    from vllm import ModelRegistry

    known = set(ModelRegistry.get_supported_archs())
    for family, arch in ARCHITECTURES.items():
        if arch not in known:
            ModelRegistry.register_model(arch, _CLASSES[family])


def vllm_refusal(family: str) -> str | None:
    """One line saying why ``family`` cannot use the vLLM engine, or None when it can."""
    if family in ARCHITECTURES:
        return None
    return (
        f"model.engine: vllm takes {' and '.join(ARCHITECTURES)} only, not {family}: vLLM sizes "
        f"its image placeholder run and M-RoPE positions from the full image grid, so pruned "
        "tokens cannot be passed (use engine: transformers)"
    )
