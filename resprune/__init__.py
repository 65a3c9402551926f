"""ResPrune: training-free visual token pruning by residual-energy subspace expansion."""

# Imported lazily: `import resprune` (and its torch-free modules, e.g. resprune.floor, which
# the job spec uses) must not pull in torch or transformers.
_LAZY = {
    "Selection": "resprune.select",
    "select_prefixes": "resprune.select",
    "select_tokens": "resprune.select",
    "answer_batch": "resprune.answer",
    "load_vlm": "resprune.loading",
    "load_preprocessor": "resprune.loading",
    "build_tiny_checkpoint": "resprune.tiny",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    """Import the model-facing API on first use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'resprune' has no attribute {name!r}")
