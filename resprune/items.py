"""The records that cross the CPU/GPU boundary: a prepared item in, an answered item out.

`PreparedItem` is what the CPU stage produces from (image, question) with the model's
processor only (no weights); it is plain numpy so it travels through Ray's object store.
`ItemResult` is what the GPU stage returns per item. Neither knows about Ray or Parquet.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class ItemError(Exception):
    """A per-item failure with a machine-readable cause, e.g. ``undecodable``."""

    def __init__(self, cause: str, message: str):
        super().__init__(f"{cause}: {message}")
        self.cause = cause
        self.message = message


@dataclass
class PreparedItem:
    """One (image, question) turned into model inputs by the processor (CPU side)."""

    input_ids: np.ndarray  # int64 [L]: the templated prompt with the full image-token run
    pixel_values: np.ndarray  # float32, family-specific shape (one image)
    image_sizes: np.ndarray | None = None  # int64 [2] (height, width): llava_next
    image_grid_thw: np.ndarray | None = None  # int64 [3]: qwen2_5_vl
    relevance_token_ids: list[list[int]] = field(default_factory=list)  # per content word
    relevance_words: list[str] = field(default_factory=list)
    relevance_extractor: str = "none"
    question: str = ""
    question_truncated: bool = False
    item_id: str = ""  # the row id, when known: seeds per-image random draws


@dataclass
class ItemResult:
    """One answered item (GPU side): the answer plus per-item pruning statistics."""

    answer: str
    visual_tokens: int
    kept_tokens: int
    kept_indices: list[int]
    retained_energy: float
    prompt_tokens: int
    prompt_tokens_unpruned: int
    new_tokens: int
    answer_ids: list[int] = field(default_factory=list)  # generated token ids, up to EOS
    kept_newlines: int = 0  # llava_next: image_newline rows kept (inside kept_tokens and keep)
    relevance_mean: float | None = None
    relevance_max: float | None = None
    vision_s: float = 0.0
    select_s: float = 0.0
    generate_s: float = 0.0
