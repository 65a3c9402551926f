"""Gemma 3 adapter: one SigLIP image pooled to a square grid of soft tokens, 1-D positions,
and bidirectional attention among one image's tokens.

The prompt holds ``<start_of_image>``, ``mm_tokens_per_image`` ``<image_soft_token>`` (the
feature token, ``config.image_token_index``) and ``<end_of_image>``. In prefill Gemma 3's
mask lets the tokens of one image block attend to each other both ways; the block is a run
of ``token_type_ids == 1``. The kept tokens keep their type: `Gemma3Adapter.token_extras`
marks exactly the kept image tokens of the cut prompt, which stay one contiguous run, so
they form one block as the full run did (the engine passes them as ``token_type_ids``; the
model reads them only in prefill). Non-goal: pan-and-scan crops.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from resprune.host import to_device
from resprune.items import PreparedItem
from resprune.models.base import (
    AdapterDefaults,
    Crop,
    Encoded,
    Layout,
    square_grid,
    text_positions,
)


class Gemma3Adapter(AdapterDefaults):
    """Hooks for `Gemma3ForConditionalGeneration`."""

    family = "gemma3"

    def encode(self, model, items: list[PreparedItem]) -> Encoded:
        """Pooled projector outputs [mm_tokens_per_image, D] per item (one batched call)."""
        pixels = np.stack([it.pixel_values for it in items])
        pixels = to_device(pixels, model.device).to(model.dtype)
        out = model.model.get_image_features(pixel_values=pixels, return_dict=True)
        return Encoded(list(out.pooler_output))

    def layout(self, model, item: PreparedItem, n: int) -> Layout:
        """One crop: the pooled square grid, row-major."""
        return Layout([Crop(torch.arange(n), square_grid(n))])

    def positions(self, model, item: PreparedItem, keep: np.ndarray, policy: str) -> np.ndarray:
        """1-D positions: the original ones (gaps where tokens were dropped) or contiguous."""
        return text_positions(keep, policy)

    def token_extras(self, model, item: PreparedItem, keep: np.ndarray) -> dict[str, np.ndarray]:
        """``token_type_ids``: 1 for the kept image tokens, 0 for text."""
        kept = item.input_ids[keep]
        return {"token_type_ids": (kept == model.config.image_token_id).astype(np.int64)}

    def encoder_output(
        self, model, features: list[torch.Tensor], side: list[torch.Tensor] | None
    ) -> BaseModelOutputWithPooling:
        """The kept features as one [sum K, D] tensor (Gemma 3 scatters a tensor, not a list)."""
        return BaseModelOutputWithPooling(pooler_output=torch.cat(features))
