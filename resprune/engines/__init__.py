"""Generation engines by name: ``transformers`` (the reference, default) and ``vllm``.

Engines are imported lazily: `import resprune.engines` needs neither torch nor vLLM, so
``validate`` can check that a job's engine is installed without loading it. An engine class
is built as ``cls(vlm, **options)`` (see `resprune.engines.base.Engine`).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from resprune.engines.base import Engine, EngineDead, Generation, Plan

if TYPE_CHECKING:
    from resprune.models.base import VLM

# name -> ("module:Class", packages the engine needs besides ours)
ENGINES: dict[str, tuple[str, tuple[str, ...]]] = {
    "transformers": ("resprune.engines.hf:TransformersEngine", ("transformers",)),
    "vllm": ("resprune.engines.vllm_engine:VllmEngine", ("vllm",)),
}


class EngineUnavailable(RuntimeError):
    """The named engine is unknown or not installed in this environment."""


def engine_problem(name: str) -> str | None:
    """One line saying why engine ``name`` cannot be built here, or None (nothing imported)."""
    if name not in ENGINES:
        return f"model.engine: unknown engine {name!r}; known: {', '.join(ENGINES)}"
    target, packages = ENGINES[name]
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        return (
            f"model.engine: {name} needs the {', '.join(missing)} package(s), not installed "
            "in this environment (see the README's engine section)"
        )
    module = target.partition(":")[0]
    if importlib.util.find_spec(module) is None:
        return f"model.engine: {name} is not available in this version ({module} is missing)"
    return None


def engine_class(name: str) -> type:
    """Import engine ``name``'s class; raises EngineUnavailable with one clear line."""
    problem = engine_problem(name)
    if problem:
        raise EngineUnavailable(problem)
    module, _, cls = ENGINES[name][0].partition(":")
    return getattr(importlib.import_module(module), cls)


def build_engine(name: str, vlm: VLM, **options: Any) -> Engine:
    """The engine ``name`` for a loaded VLM (``options``: the engine's own settings)."""
    return engine_class(name)(vlm, **options)


__all__ = [
    "ENGINES",
    "Engine",
    "EngineDead",
    "EngineUnavailable",
    "Generation",
    "Plan",
    "build_engine",
    "engine_class",
    "engine_problem",
]
