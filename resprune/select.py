"""ResPrune's token selector: greedy subspace expansion by text-modulated residual energy.

With S the kept set and P_S the projector onto span{v_j : j in S}, each step adds the token
with the largest ``g(r_i) * ||v_i - P_S v_i||^2`` where ``g(r) = max(r, floor) ** alpha``.
Scaling each token by ``sqrt(g(r_i))`` turns this into greedy column-pivoted QR, computed here
as incremental Gram-Schmidt in float32: after picking the unit residual q, every token's
energy drops by ``<q, y>^2``. The projections ``<q, y>`` come from the Gram matrix (one
batched GEMM, O(B N^2 D)), so the loop over the k steps costs O(B N k) per step instead of
another memory-bound pass over all tokens; batched over images, no loop over images.

This module knows nothing about models, questions or text: relevance arrives as numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from resprune.floor import RELEVANCE_FLOOR, check_relevance_floor


@dataclass(frozen=True)
class Selection:
    """Kept token indices (ascending) and the share of token energy their span retains."""

    indices: torch.Tensor  # long [k] or [B, k]
    retained_energy: torch.Tensor  # float32 [] or [B]


def relevance_weights(
    relevance: torch.Tensor, alpha: float, floor: float = RELEVANCE_FLOOR
) -> torch.Tensor:
    """``g(r) = max(r, floor) ** alpha``: r ** alpha above the floor; alpha = 0 gives all ones."""
    if alpha == 0:
        return torch.ones_like(relevance, dtype=torch.float32)
    return relevance.float().clamp_min(floor).pow(alpha)


def select_tokens(
    tokens: torch.Tensor,
    k: int,
    *,
    relevance: torch.Tensor | None = None,
    alpha: float = 1.0,
    mask: torch.Tensor | None = None,
    relevance_floor: float = RELEVANCE_FLOOR,
) -> Selection:
    """Select ``k`` tokens per image by greedy residual-energy subspace expansion.

    Args:
        tokens: float [N, D] or [B, N, D], any float dtype (computed in float32).
        k: tokens to keep per image, 1 <= k <= valid tokens of every image.
        relevance: None (r = 1) or [N] / [B, N] text relevance r_i.
        alpha: exponent of the relevance modulation; 0 ignores relevance.
        mask: None or bool [B, N] (or [N]), True for valid tokens; padding is never kept.
        relevance_floor: relevance below it counts as the floor, ``g(r) = max(r, floor) ** alpha``.
    """
    single = tokens.dim() == 2
    check_relevance_floor(alpha, relevance_floor)
    x, r, m = _validate(tokens, k, relevance, mask)
    w = None if r is None or alpha == 0 else relevance_weights(r, alpha, relevance_floor)
    y = x if w is None else x * w.sqrt().unsqueeze(-1)
    chosen, coef = _greedy_pivots(y, m, k)
    indices = chosen.sort(dim=-1).values
    retained = _retained_energy(x, m, coef, w)
    if single:
        return Selection(indices[0], retained[0])
    return Selection(indices, retained)


def _validate(
    tokens: torch.Tensor, k: int, relevance: torch.Tensor | None, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    if not isinstance(tokens, torch.Tensor) or not tokens.is_floating_point():
        raise ValueError(f"tokens must be a float tensor, got {type(tokens).__name__}")
    if tokens.dim() not in (2, 3):
        raise ValueError(f"tokens must be [N, D] or [B, N, D], got shape {tuple(tokens.shape)}")
    x = (tokens if tokens.dim() == 3 else tokens.unsqueeze(0)).float()
    b, n, _ = x.shape
    m = _batched(mask, "mask", (b, n), tokens.dim())
    m = torch.ones(b, n, dtype=torch.bool, device=x.device) if m is None else m.bool()
    if not torch.isfinite(x[m]).all():
        raise ValueError("tokens contains NaN or inf among the valid tokens")
    valid = int(m.sum(-1).min()) if b else 0
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k > valid:
        raise ValueError(f"k must be an int in [1, {valid}] (valid tokens per image), got {k!r}")
    r = _batched(relevance, "relevance", (b, n), tokens.dim())
    if r is not None and not torch.isfinite(r.float()[m]).all():
        raise ValueError("relevance contains NaN or inf")
    return x, (None if r is None else r.to(x.device)), m.to(x.device)


def _batched(
    value: torch.Tensor | None, name: str, shape: tuple[int, int], token_dims: int
) -> torch.Tensor | None:
    if value is None:
        return None
    v = value.unsqueeze(0) if (token_dims == 2 and value.dim() == 1) else value
    if tuple(v.shape) != shape:
        want = shape[1:] if token_dims == 2 else shape
        raise ValueError(f"{name} must have shape {want}, got {tuple(value.shape)}")
    return v


def _greedy_pivots(
    y: torch.Tensor, mask: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy pivoted Gram-Schmidt on the Gram matrix (pivoted Cholesky).

    Returns the pick order [B, k] and the coefficients ``c[b, i, s] = <q_s, y_i>`` [B, N, k]
    of every token on the orthonormal basis built so far. One batched GEMM builds the Gram
    matrix; each step then costs O(N k) instead of another O(N D) pass over the tokens.
    """
    b, n, _ = y.shape
    rows = torch.arange(b, device=y.device)
    gram = torch.bmm(y, y.transpose(1, 2))  # [B, N, N]
    blocked = ~mask  # padding, then every picked token
    energy = torch.diagonal(gram, dim1=1, dim2=2).clone().masked_fill(blocked, -1.0)
    chosen = torch.empty(b, k, dtype=torch.long, device=y.device)
    coef = torch.zeros(b, n, k, dtype=y.dtype, device=y.device)
    for step in range(k):
        pick = energy.argmax(dim=-1)  # first maximum: ties break to the lowest index
        chosen[:, step] = pick
        resid = energy[rows, pick].clamp_min(0.0)
        col = (
            gram[rows, :, pick]
            - torch.bmm(coef[:, :, :step], coef[rows, pick, :step, None])[..., 0]
        )
        # a residual at float32 round-off of its token adds no direction (rank exhausted)
        alive = resid > 1e-8 * gram[rows, pick, pick]
        col = torch.where(alive[:, None], col / resid.clamp_min(1e-30).sqrt()[:, None], 0.0)
        coef[:, :, step] = col
        blocked[rows, pick] = True
        energy = (energy - col * col).clamp_min(0.0).masked_fill(blocked, -1.0)
    return chosen, coef


def _retained_energy(
    x: torch.Tensor, mask: torch.Tensor, coef: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    """``1 - sum_i E_S(x_i) / sum_i ||x_i||^2`` over valid tokens (x unscaled).

    The span of the kept scaled tokens equals the span of the kept tokens, so the energy of
    x_i inside it is the captured energy of y_i divided by its weight.
    """
    captured = coef.pow(2).sum(-1)  # [B, N] = ||P_S y_i||^2
    if weights is not None:
        captured = captured / weights
    captured = (captured * mask).sum(-1)
    total = ((x * x).sum(-1) * mask).sum(-1)
    share = (captured / total.clamp_min(1e-30)).clamp_max(1.0)  # float32 round-off above 1
    return torch.where(total > 0, share, torch.ones_like(total))
