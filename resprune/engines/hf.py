"""The transformers engine (reference and default): one left-padded greedy ``generate``.

The kept features go in as ``mm_encoder_outputs``, so the model's own merge places them in
the cut image-token run; explicit ``position_ids`` carry the kept tokens' positions (for
M-RoPE, row 0 is the 1-D text position transformers builds the causal mask from). A whole
batch fails together: ``generate`` raising is a batch failure.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from resprune.engines.base import Generation, Plan
from resprune.items import ItemError
from resprune.models.base import VLM


class TransformersEngine:
    """Greedy batched ``generate`` of the VLM's own language model."""

    name = "transformers"

    def __init__(self, vlm: VLM):
        self.vlm = vlm

    def generate(self, plans: Sequence[Plan], max_new_tokens: int) -> list[Generation | ItemError]:
        """One left-padded ``generate`` over ``plans``; answers cut after the first EOS."""
        if not plans:
            return []
        vlm, model = self.vlm, self.vlm.model
        ids, mask, positions = left_pad(vlm, plans)
        if hasattr(model.model, "rope_deltas"):
            model.model.rope_deltas = None  # cached M-RoPE state from an earlier call
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            mm_encoder_outputs={
                "image": BaseModelOutputWithPooling(pooler_output=[p.features for p in plans])
            },
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id(vlm),
        )
        return decode(vlm, out[:, ids.shape[1] :].cpu())


def decode(vlm: VLM, new: torch.Tensor) -> list[Generation | ItemError]:
    """Per row of new token ids: the ids up to the first EOS and their text."""
    eos = vlm.model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    answers: list[Generation | ItemError] = []
    for row in new.tolist():
        n = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
        text = vlm.tokenizer.decode(row[:n], skip_special_tokens=True).strip()
        answers.append(Generation(text, row[:n]))
    return answers


def left_pad(vlm: VLM, plans: Sequence[Plan]) -> tuple[torch.Tensor, ...]:
    """Left-pad ids, mask and positions; pads get position 0, as stock ``generate`` does."""
    b, length, rows = len(plans), max(len(p.ids) for p in plans), plans[0].positions.shape[0]
    ids = torch.full((b, length), pad_id(vlm), dtype=torch.long, device=vlm.device)
    mask = torch.zeros(b, length, dtype=torch.long, device=vlm.device)
    pos = torch.zeros(rows, b, length, dtype=torch.long, device=vlm.device)
    for i, p in enumerate(plans):
        n = len(p.ids)
        ids[i, length - n :], mask[i, length - n :], pos[:, i, length - n :] = p.ids, 1, p.positions
    if rows == 1:
        return ids, mask, pos[0]
    # M-RoPE: row 0 is the 1-D text position transformers uses to build the causal mask.
    text = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return ids, mask, torch.cat([text[None], pos])


def pad_id(vlm: VLM) -> int:
    """The tokenizer's pad id, else the model's EOS."""
    pad = vlm.tokenizer.pad_token_id
    return pad if pad is not None else vlm.model.generation_config.eos_token_id
