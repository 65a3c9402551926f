"""ResPrune: training-free visual token pruning by residual-energy subspace expansion."""

from resprune.select import Selection, select_prefixes, select_tokens

# Model-facing API, imported lazily: `import resprune` must not pull in transformers.
_LAZY = {
    "answer_batch": "resprune.answer",
    "load_vlm": "resprune.loading",
    "load_preprocessor": "resprune.loading",
    "build_tiny_checkpoint": "resprune.tiny",
}

__all__ = ["Selection", "select_prefixes", "select_tokens", *_LAZY]


def __getattr__(name: str):
    """Import the model-facing API on first use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'resprune' has no attribute {name!r}")
