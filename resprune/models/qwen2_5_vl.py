"""Qwen2.5-VL adapter: merged 2x2 patch tokens, 3-D M-RoPE positions.

Pruning acts on the merged tokens that enter the LLM (one row-major (h/2, w/2) grid per
image). ``original`` positions are computed by the model's own ``get_rope_index`` on the
unpruned sequence and then indexed, so every kept token keeps its (t, row, col) position and
the text after the image keeps its offset; ``contiguous`` renumbers the kept sequence
0..L'-1 on all three axes, as for plain text (an ablation: it discards the 2-D layout).
Non-goal: video.
"""

from __future__ import annotations

import torch

from resprune.items import PreparedItem
from resprune.models.base import Crop, Layout, text_positions


class Qwen2_5_VLAdapter:
    """Hooks for `Qwen2_5_VLForConditionalGeneration`."""

    family = "qwen2_5_vl"

    def encode(self, model, items: list[PreparedItem]) -> list[torch.Tensor]:
        """Merged projector outputs [t*h*w/4, D] per item (one batched vision call)."""
        pixels = torch.cat([torch.from_numpy(it.pixel_values) for it in items])
        grids = torch.stack([torch.from_numpy(it.image_grid_thw) for it in items])
        out = model.model.get_image_features(
            pixel_values=pixels.to(model.device, model.dtype),
            image_grid_thw=grids.to(model.device),
            return_dict=True,
        )
        return list(out.pooler_output)

    def layout(self, model, item: PreparedItem, n: int) -> Layout:
        """One crop: the merged (h/2, w/2) grid, row-major (one frame)."""
        t, h, w = (int(v) for v in item.image_grid_thw)
        merge = model.config.vision_config.spatial_merge_size
        grid = (t * h // merge, w // merge)
        return Layout([Crop(torch.arange(n), grid if grid[0] * grid[1] == n else None)])

    def positions(
        self, model, ids: torch.Tensor, item: PreparedItem, keep: torch.Tensor, policy: str
    ) -> torch.Tensor:
        """3-D M-RoPE positions [3, L'] of the kept tokens."""
        if policy != "original":
            return text_positions(keep, policy).expand(3, -1)
        image = (ids == model.config.image_token_id).int()
        grid = torch.from_numpy(item.image_grid_thw)[None].to(ids.device)
        pos, _ = model.model.get_rope_index(ids[None], image[None], image_grid_thw=grid)
        return pos[:, 0, keep]
