"""Qwen2.5-VL adapter: merged 2x2 patch tokens, 3-D M-RoPE positions.

Pruning acts on the merged tokens that enter the LLM (one row-major (h/2, w/2) grid per
image). ``original`` positions are those of the unpruned sequence (computed on the host from
the model's own ``get_vision_position_ids``, equal to its ``get_rope_index``, a test checks)
and then indexed, so every kept token keeps its (t, row, col) position and
the text after the image keeps its offset; ``contiguous`` renumbers the kept sequence
0..L'-1 on all three axes, as for plain text (an ablation: it discards the 2-D layout).
Non-goal: video.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import vision_utils
from transformers.utils.generic import get_max_seqlen, is_flash_attention_requested

from resprune.host import to_device
from resprune.items import PreparedItem
from resprune.models.base import AdapterDefaults, Crop, Encoded, Layout, text_positions


class Qwen2_5_VLAdapter(AdapterDefaults):
    """Hooks for `Qwen2_5_VLForConditionalGeneration`."""

    family = "qwen2_5_vl"

    def encode(self, model, items: list[PreparedItem]) -> Encoded:
        """Merged projector outputs [t*h*w/4, D] per item (one batched vision call)."""
        return Encoded(list(self.vision_output(model, items).pooler_output))

    def vision_output(self, model, items: list[PreparedItem]):
        """The vision tower's output for the batch (one call, its layout from the host)."""
        pixels = np.concatenate([it.pixel_values for it in items])
        grids = torch.from_numpy(np.stack([it.image_grid_thw for it in items]))
        return model.model.get_image_features(
            pixel_values=to_device(pixels, model.device).to(model.dtype),
            image_grid_thw=grids,  # on the host: only the precomputed layout below reads it
            return_dict=True,
            **self.vision_layout(model, grids),
        )

    def vision_layout(self, model, grids: torch.Tensor) -> dict:
        """The tower's precomputed position and attention inputs (`vision_layout`)."""
        return vision_layout(model, grids)

    def layout(self, model, item: PreparedItem, n: int) -> Layout:
        """One crop: the merged (h/2, w/2) grid, row-major (one frame)."""
        t, h, w = (int(v) for v in item.image_grid_thw)
        merge = model.config.vision_config.spatial_merge_size
        grid = (t * h // merge, w // merge)
        return Layout([Crop(torch.arange(n), grid if grid[0] * grid[1] == n else None)])

    def positions(self, model, item: PreparedItem, keep: np.ndarray, policy: str) -> np.ndarray:
        """3-D M-RoPE positions [3, L'] of the kept tokens."""
        if policy != "original":
            return np.repeat(text_positions(keep, policy), 3, axis=0)
        return mrope_positions(model, item)[:, keep]


def vision_layout(model, grids: torch.Tensor) -> dict:
    """The vision tower's data-dependent inputs, computed on the host from the grids with
    transformers' own `transformers.vision_utils` (which would otherwise read the grids on the
    device, several times per batch and once per attention layer): rotary positions, window
    order and the packed sequence boundaries. Boundaries stay on the host for SDPA / eager
    (they only split the sequence there) and go to the device for FlashAttention's varlen
    kernels; the rest go to the device in one copy."""
    visual = model.model.visual
    config = visual.config
    positions = vision_utils.get_vision_position_ids(grids, visual.spatial_merge_size)
    cu_seqlens, max_seqlen = vision_utils.get_vision_attention_seqlens(grids, config)
    window_index, cu_windows = vision_utils.get_vision_window_index(
        grids,
        spatial_merge_size=visual.spatial_merge_size,
        window_size=visual.window_size,
        patch_size=visual.patch_size,
    )
    max_window = get_max_seqlen(cu_windows, config, kwarg_name="max_window_seqlen")
    longs = [positions.flatten(), window_index]
    if is_flash_attention_requested(config):
        longs += [cu_seqlens.long(), cu_windows.long()]
    flat = to_device(torch.cat(longs).numpy(), model.device).split([len(t) for t in longs])
    layout = {
        "position_ids": flat[0].view(positions.shape),
        "window_index": flat[1],
        "cu_seqlens": cu_seqlens,
        "cu_window_seqlens": cu_windows,
        "max_seqlen": max_seqlen,
        "max_window_seqlen": max_window,
    }
    if is_flash_attention_requested(config):
        layout["cu_seqlens"], layout["cu_window_seqlens"] = (t.int() for t in flat[2:])
    return layout


def mrope_positions(model, item: PreparedItem) -> np.ndarray:
    """M-RoPE positions [3, L] of the unpruned prompt (one image), on the host: what the
    model's ``get_rope_index`` gives, built from its own ``get_vision_position_ids`` for the
    image run and its rule for text (1-D, the text after the image starting at the image's
    start + max(h, w) / merge), without reading the device."""
    ids = item.input_ids
    run = np.flatnonzero(ids == model.config.image_token_id)
    start = int(run[0]) if len(run) else len(ids)
    merge = model.config.vision_config.spatial_merge_size
    grid = item.image_grid_thw  # numpy: transformers reads it with .item()
    vision = model.model.get_vision_position_ids(start, grid, 1, merge, 1, device="cpu").numpy()
    after = start + max(int(grid[1]), int(grid[2])) // merge
    text_after = np.arange(len(ids) - start - len(run)) + after
    return np.concatenate(
        [np.repeat(np.arange(start)[None], 3, 0), vision, np.repeat(text_after[None], 3, 0)],
        axis=1,
    ).astype(np.int64)
