"""LLaVA-NeXT adapter: anyres crops, ``image_newline`` rows, plain 1-D positions.

The packed features of one image are the base view (a 24x24 grid) followed by the unpadded
high-resolution grid, one ``image_newline`` token closing each of its rows. The layout is
recovered by running transformers' own ``pack_image_features`` on a tensor of token
coordinates, so unpadding is never re-implemented here. Each high-resolution tile is one
crop (its surviving rows x cols), so per-crop budgets follow the crops the model was fed.

``image_newline`` decision: a newline is not a visual token (it is one learned vector, the
same for every row) and is never offered to the pruner. It is kept exactly for the rows
that keep at least one token, and dropped with rows that lose all of theirs. Why: the model
was trained with a newline closing each row, so kept rows still end the way it expects; a
row with nothing left has nothing to close; with ``keep = all`` every newline stays and the
prompt is byte-identical to the stock one (the equality anchor). Kept newlines count
inside the image's budget (`resprune.budget`), so ``keep`` is what the LLM sees and
pruners with different spatial spreads get the same real budget (``kept_newlines`` in the
item stats says how much of it went to rows).
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

from resprune.host import to_device
from resprune.items import PreparedItem
from resprune.models.base import AdapterDefaults, Crop, Encoded, Layout, text_positions

NEWLINE = -1.0
BASE = -2.0


class LlavaNextAdapter(AdapterDefaults):
    """Hooks for `LlavaNextForConditionalGeneration`."""

    family = "llava_next"

    def encode(self, model, items: list[PreparedItem]) -> Encoded:
        """Packed projector outputs per item (base + high-res grid + newlines), batched."""
        pixels = np.concatenate([it.pixel_values for it in items])
        out = model.model.get_image_features(
            pixel_values=to_device(pixels, model.device).to(model.dtype),
            # a list: transformers reads each image's size with .tolist(), a device read
            # per image when they are a device tensor
            image_sizes=[it.image_sizes.tolist() for it in items],
            return_dict=True,
        )
        return Encoded(list(out.pooler_output))

    def layout(self, model, item: PreparedItem, n: int) -> Layout:
        """Crops (base view, then each high-res tile) and the newline closing each row."""
        coords = _packed_coordinates(model, item).numpy()
        if coords.shape[0] != n:
            raise ValueError(f"layout has {coords.shape[0]} tokens but features have {n}")
        tile, row, col, grid_row = coords.T
        crops = []
        for t in np.unique(tile[tile != NEWLINE]):
            index = np.flatnonzero(tile == t)
            rows, cols = len(np.unique(row[index])), len(np.unique(col[index]))
            grid = (rows, cols) if rows * cols == len(index) else None
            crops.append(Crop(torch.from_numpy(index), grid))
        newline_rows = []
        for p in np.flatnonzero(tile == NEWLINE):
            members = np.flatnonzero((grid_row == grid_row[p - 1]) & (tile != NEWLINE))
            newline_rows.append((int(p), torch.from_numpy(members)))
        return Layout(crops, newline_rows)

    def positions(self, model, item: PreparedItem, keep: np.ndarray, policy: str) -> np.ndarray:
        """1-D positions: the original ones (gaps where tokens were dropped) or contiguous."""
        return text_positions(keep, policy)


def _packed_coordinates(model, item: PreparedItem) -> torch.Tensor:
    """[N, 4] (tile, row in tile, col in tile, high-res grid row) of each packed token.

    Newline tokens are all NEWLINE; base-view tokens have grid row BASE.
    """
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    tiles = item.pixel_values.shape[0]
    npw = _tile_cols(model, item, tiles - 1)
    t = torch.arange(tiles).view(tiles, 1, 1).expand(tiles, side, side)
    r = torch.arange(side).view(1, side, 1).expand(tiles, side, side)
    c = torch.arange(side).view(1, 1, side).expand(tiles, side, side)
    tile_row = torch.cat([torch.zeros(1), torch.arange(tiles - 1).float() // max(npw, 1)])
    g = torch.where(t == 0, BASE, tile_row.view(tiles, 1, 1) * side + r)
    coords = torch.stack([t.float(), r.float(), c.float(), g.float()], -1).view(tiles, -1, 4)
    packed, _ = model.model.pack_image_features(
        [coords],
        [item.image_sizes.tolist()],  # a list: transformers reads a tensor's with .tolist()
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        image_newline=torch.full((4,), NEWLINE),
    )
    return packed[0]


def _tile_cols(model, item: PreparedItem, n_tiles: int) -> int:
    """Columns of the high-resolution tile grid (0 without one)."""
    if n_tiles == 0:
        return 0
    _, cols = get_anyres_image_grid_shape(
        item.image_sizes.tolist(),
        model.config.image_grid_pinpoints,
        model.config.vision_config.image_size,
    )
    return cols
