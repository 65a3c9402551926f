"""Qwen3-VL adapter (dense ``qwen3_vl`` and MoE ``qwen3_vl_moe``): merged 2x2 patch tokens,
3-D M-RoPE positions, and DeepStack.

As for Qwen2.5-VL, pruning acts on the merged tokens that enter the LLM (one row-major
(h/2, w/2) grid per image), and ``original`` positions are the unpruned sequence's M-RoPE
positions (the same rule: `resprune.models.qwen2_5_vl.mrope_positions`), indexed.
DeepStack: the vision tower also returns one merged feature row per token from each of
several vision layers, added to the first LLM layers' hidden states at the visual positions.
They are the adapter's side rows (`Encoded.side`, [N, levels, D]), so the kept tokens keep
exactly their own rows in every level and the dropped tokens' rows go with them; the model
marks only the kept positions (its placeholder mask is the cut image-token run). The pool
baseline's replacement tokens take their windows' centres' DeepStack rows.
The MoE checkpoint differs only in the LLM's MLP. Non-goal: video.
"""

from __future__ import annotations

import torch
from transformers import vision_utils
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures
from transformers.utils.generic import is_flash_attention_requested

from resprune.host import to_device
from resprune.items import PreparedItem
from resprune.models.base import Encoded
from resprune.models.qwen2_5_vl import Qwen2_5_VLAdapter


class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    """Hooks for `Qwen3VLForConditionalGeneration` and `Qwen3VLMoeForConditionalGeneration`:
    Qwen2.5-VL's merged-grid layout and M-RoPE positions, plus the DeepStack side rows."""

    def __init__(self, family: str = "qwen3_vl"):
        self.family = family

    def encode(self, model, items: list[PreparedItem]) -> Encoded:
        """Merged projector outputs [t*h*w/4, D] per item and their DeepStack rows
        [t*h*w/4, levels, D] (one batched vision call)."""
        out = self.vision_output(model, items)
        side = [torch.stack(levels, 1) for levels in zip(*out.deepstack_features, strict=True)]
        return Encoded(list(out.pooler_output), side)

    def vision_layout(self, model, grids: torch.Tensor) -> dict:
        """Qwen3-VL's precomputed tower inputs (its learned position table's interpolation)."""
        return vision_layout(model, grids)

    def encoder_output(
        self, model, features: list[torch.Tensor], side: list[torch.Tensor] | None
    ) -> BaseModelOutputWithDeepstackFeatures:
        """The kept features with their DeepStack rows, one tuple of per-item rows per level
        (what ``get_image_features`` returns)."""
        levels = side[0].shape[1] if side else 0
        deepstack = [tuple(s[:, level] for s in side) for level in range(levels)]
        return BaseModelOutputWithDeepstackFeatures(
            pooler_output=features, deepstack_features=deepstack
        )


def vision_layout(model, grids: torch.Tensor) -> dict:
    """The vision tower's data-dependent inputs, computed on the host from the grids with
    transformers' own `transformers.vision_utils` (the tower would otherwise compute them
    from the grids on the device, reading them back): rotary positions, the learned position
    table's interpolation taps and weights, and the packed sequence boundaries (on the host
    for SDPA / eager, on the device for FlashAttention's varlen kernels)."""
    visual = model.model.visual
    config = visual.config
    merge = visual.spatial_merge_size
    positions = vision_utils.get_vision_position_ids(grids, merge)
    taps, weights = vision_utils.get_vision_interpolation_indices_and_weights(
        grids,
        num_grid_per_side=visual.num_grid_per_side,
        mode=visual.interpolation_mode,
        align_corners=visual.interpolation_align_corners,
        spatial_merge_size=merge,
    )
    cu_seqlens, max_seqlen = vision_utils.get_vision_attention_seqlens(grids, config)
    longs = [positions.flatten(), taps.flatten()]
    flash = is_flash_attention_requested(config)
    if flash:
        longs.append(cu_seqlens.long())
    flat = to_device(torch.cat(longs).numpy(), model.device).split([len(t) for t in longs])
    layout = {
        "position_ids": flat[0].view(positions.shape),
        "interp_indices": flat[1].view(taps.shape),
        "interp_weights": to_device(weights.numpy(), model.device),
        "cu_seqlens": flat[2].int() if flash else cu_seqlens,
        "max_seqlen": max_seqlen,
    }
    return layout
