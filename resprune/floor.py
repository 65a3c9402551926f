"""The relevance floor of ``g(r) = max(r, floor) ** alpha``, checked without importing torch.

``r`` is a cosine in [-1, 1]; ``r ** alpha`` is undefined for r <= 0, so relevance below the
floor counts as the floor. With alpha > 0 and the default 1e-6 this is a sign gate: a token
whose cosine to the question is <= 0 weighs ~1e-6 of a well related one, so it is picked
only once the related tokens have no residual energy left. A larger floor lets such tokens
compete by residual energy at a fixed discount. With alpha < 0 (least related tokens
favoured) the floor sets the largest weight, ``floor ** alpha``.
"""

from __future__ import annotations

import math

RELEVANCE_FLOOR = 1e-6
MAX_WEIGHT_RANGE = 1e30  # g's max/min ratio; beyond it float32 weights overflow or vanish


def check_relevance_floor(alpha: float, floor: float) -> None:
    """Raise ValueError unless ``max(r, floor) ** alpha`` is finite and positive on [-1, 1]."""
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    if not 0 < floor <= 1:
        raise ValueError(f"relevance_floor must be in (0, 1], got {floor}")
    if alpha != 0 and -abs(alpha) * math.log10(floor) > math.log10(MAX_WEIGHT_RANGE):
        raise ValueError(
            f"relevance_floor={floor} with alpha={alpha} spans weights over 1e30 (float32 "
            "overflow); raise the floor or lower |alpha|"
        )
