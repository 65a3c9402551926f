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

from resprune.items import PreparedItem
from resprune.models.base import ConcatEncoderOutput
from resprune.models.llava import LlavaAdapter


class Gemma3Adapter(ConcatEncoderOutput, LlavaAdapter):
    """Hooks for `Gemma3ForConditionalGeneration`: LLaVA's encode (the pooled projector outputs
    [mm_tokens_per_image, D] per item), one square crop and 1-D positions, plus the image
    tokens' ``token_type_ids`` and the kept features handed back as one tensor."""

    family = "gemma3"

    def token_extras(self, model, item: PreparedItem, keep: np.ndarray) -> dict[str, np.ndarray]:
        """``token_type_ids``: 1 for the kept image tokens, 0 for text."""
        kept = item.input_ids[keep]
        return {"token_type_ids": (kept == model.config.image_token_id).astype(np.int64)}
