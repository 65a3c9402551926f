"""InternVL (3 / 3.5) adapter: dynamic 448 px tiles plus a thumbnail, each pixel-shuffled to a
square grid of tokens (256 at 448 px), 1-D positions.

The processor writes ``<img>`` + tokens-per-tile x tiles ``<IMG_CONTEXT>`` + ``</img>`` and
gives ``pixel_values`` [tiles, 3, S, S] (tiles row-major, the thumbnail last when there is
more than one tile). Each tile, the thumbnail included, is one crop with its own square
grid, so selection runs per image over all of its tiles with the budget across them, as for
LLaVA-NeXT's ``per_crop`` (``anyres: global`` selects over the image's tokens at once). The
``<img>`` / ``</img>`` delimiters are text: always kept, never counted in ``keep``.
Non-goal: video.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from transformers import InternVLProcessor
from transformers.processing_utils import ProcessorMixin

from resprune.host import to_device
from resprune.items import PreparedItem
from resprune.models.base import (
    AdapterDefaults,
    ConcatEncoderOutput,
    Crop,
    Encoded,
    Layout,
    square_grid,
    text_positions,
)


class InternVLAdapter(ConcatEncoderOutput, AdapterDefaults):
    """Hooks for `InternVLForConditionalGeneration` (the kept features go back as one tensor)."""

    family = "internvl"

    def encode(self, model, items: list[PreparedItem]) -> Encoded:
        """Projector outputs [tiles x tokens per tile, D] per item (one batched call)."""
        tiles = [it.pixel_values.shape[0] for it in items]
        pixels = to_device(np.concatenate([it.pixel_values for it in items]), model.device)
        out = model.model.get_image_features(
            pixel_values=pixels.to(model.dtype),
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
            return_dict=True,
        )
        per_tile = out.pooler_output  # [all tiles, tokens per tile, D]
        return Encoded([t.flatten(0, 1) for t in per_tile.split(tiles)])

    def layout(self, model, item: PreparedItem, n: int) -> Layout:
        """One crop per tile (the thumbnail last), each a square grid."""
        tiles = item.pixel_values.shape[0]
        if n % tiles:
            raise ValueError(f"{n} features do not split into {tiles} tiles")
        per = n // tiles
        return Layout(
            [Crop(torch.arange(t * per, (t + 1) * per), square_grid(per)) for t in range(tiles)]
        )

    def positions(self, model, item: PreparedItem, keep: np.ndarray, policy: str) -> np.ndarray:
        """1-D positions: the original ones (gaps where tokens were dropped) or contiguous."""
        return text_positions(keep, policy)


class ImageOnlyInternVLProcessor(InternVLProcessor):
    """`InternVLProcessor` with only an image processor and a tokenizer (its video processor
    needs torchvision)."""

    def __init__(
        self, image_processor=None, tokenizer=None, image_seq_length=256, chat_template=None, **_
    ):
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
        self.image_seq_length = image_seq_length
        self.start_image_token = tokenizer.start_image_token
        self.end_image_token = tokenizer.end_image_token
        self.start_image_token_id = tokenizer.start_image_token_id
        self.end_image_token_id = tokenizer.end_image_token_id
        self.image_token = tokenizer.context_image_token
        self.image_token_id = tokenizer.context_image_token_id
        self.video_token = getattr(tokenizer, "video_token", None) or "<video>"
        self.multimodal_pattern = re.compile(
            f"(?P<image>{re.escape(self.image_token)})|(?P<video>{re.escape(self.video_token)})"
        )
