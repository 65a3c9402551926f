"""ResPrune Pipeline: batch VLM answering on Ray Data with visual-token pruning.

The public Python surface is the stage API, `build_processor` and `ProcessorConfig` (see
`pipeline.stages.processor`); they are imported on first use, so `python -m pipeline validate`
never imports Ray or torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ProcessorConfig", "build_processor"]


def __getattr__(name: str) -> Any:
    if name == "build_processor":
        from pipeline.stages.processor import build_processor

        return build_processor
    if name == "ProcessorConfig":
        from pipeline.spec import ProcessorConfig

        return ProcessorConfig
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
