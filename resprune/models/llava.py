"""LLaVA-1.5 adapter: one 24x24 grid of projector outputs per image, plain 1-D positions.

Non-goal: multi-image prompts.
"""

from __future__ import annotations

import numpy as np
import torch

from resprune.host import to_device
from resprune.items import PreparedItem
from resprune.models.base import AdapterDefaults, Crop, Encoded, Layout, square_grid, text_positions


class LlavaAdapter(AdapterDefaults):
    """Hooks for `LlavaForConditionalGeneration`."""

    family = "llava"

    def encode(self, model, items: list[PreparedItem]) -> Encoded:
        """Projector outputs [576, D] per item (one batched vision-tower call)."""
        pixels = np.stack([it.pixel_values for it in items])
        pixels = to_device(pixels, model.device).to(model.dtype)
        out = model.model.get_image_features(pixel_values=pixels, return_dict=True)
        return Encoded(list(out.pooler_output))

    def layout(self, model, item: PreparedItem, n: int) -> Layout:
        """One crop: the whole image, a square row-major grid."""
        return Layout([Crop(torch.arange(n), square_grid(n))])

    def positions(self, model, item: PreparedItem, keep: np.ndarray, policy: str) -> np.ndarray:
        """1-D positions: the original ones (gaps where tokens were dropped) or contiguous."""
        return text_positions(keep, policy)
