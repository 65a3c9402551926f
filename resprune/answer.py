"""Answer a batch of prepared (image, question) items with visual-token pruning before the LLM.

Per batch: one vision-tower call; one pruner call over every crop of every item (selection
is per image or crop, never normalised across the batch); then each prompt's image-token
run, attention mask and positions are cut to the kept tokens, and one left-padded
``generate`` runs with the kept features passed as ``mm_encoder_outputs``. ``keep`` bounds
all the LLM sees of an image, layout rows included (`resprune.budget`). No attention
maps are needed, so SDPA / FlashAttention keep working. Timings are per batch, synchronised
with the device, and reported per item as the batch time divided by the batch size.
Non-goals: sampling (decoding is greedy), streaming, multi-image prompts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from resprune.budget import ImageTokens, Picks, kept_index, kept_rows, select_within_budget
from resprune.items import ItemError, ItemResult, PreparedItem
from resprune.models.base import POSITION_POLICIES, VLM, Crop, Layout, sync
from resprune.pruners import Pruner, build_pruner

ANYRES_MODES = ("per_crop", "global")


@dataclass
class _Plan:
    """One item after selection: the kept sequence, its features and positions, its stats."""

    ids: torch.Tensor  # [L'] kept prompt ids
    features: torch.Tensor  # [k, D] features for the kept image tokens, in sequence order
    positions: torch.Tensor  # [R, L'] (R = 1, or 3 for M-RoPE)
    stats: dict


def answer_batch(
    vlm: VLM,
    items: list[PreparedItem],
    *,
    pruner: Pruner | None,
    keep: int | float,
    max_new_tokens: int,
    position_policy: str = "original",
    anyres: str = "per_crop",
) -> list[ItemResult | ItemError]:
    """Answer ``items`` in one batch; an item-level failure is an ItemError in its slot."""
    if position_policy not in POSITION_POLICIES:
        raise ValueError(f"position_policy must be one of {POSITION_POLICIES}")
    if anyres not in ANYRES_MODES:
        raise ValueError(f"anyres must be one of {ANYRES_MODES}, got {anyres!r}")
    if not items:
        return []
    pruner = pruner or build_pruner("none")
    with torch.inference_mode():
        t0 = _now(vlm)
        feats = vlm.adapter.encode(vlm.model, items)
        t1 = _now(vlm)
        plans = _select(vlm, items, feats, pruner, keep, anyres, position_policy)
        t2 = _now(vlm)
        out: list[ItemResult | ItemError | None] = [
            p if isinstance(p, ItemError) else _fits(vlm, p, max_new_tokens) for p in plans
        ]
        ok = [i for i, r in enumerate(out) if r is None]
        answers = _generate(vlm, [plans[i] for i in ok], max_new_tokens) if ok else []
        t3 = _now(vlm)
    share = {"vision_s": (t1 - t0), "select_s": (t2 - t1), "generate_s": (t3 - t2)}
    share = {key: value / len(items) for key, value in share.items()}
    for i, (answer, ids) in zip(ok, answers, strict=True):
        out[i] = ItemResult(
            answer=answer, answer_ids=ids, new_tokens=len(ids), **plans[i].stats, **share
        )
    return out  # type: ignore[return-value]


def _now(vlm: VLM) -> float:
    sync(vlm.device)
    return time.perf_counter()


def _select(vlm, items, feats, pruner, keep, anyres, policy) -> list[_Plan | ItemError]:
    """One pruner call over every crop of every item (within budget), then each kept sequence."""
    layouts = [
        vlm.adapter.layout(vlm.model, it, f.shape[0]) for it, f in zip(items, feats, strict=True)
    ]
    images = [
        ImageTokens(
            feat, _crops(lay, anyres), lay.newline_rows, _text_embeddings(vlm, item), item.item_id
        )
        for item, feat, lay in zip(items, feats, layouts, strict=True)
    ]
    picks = select_within_budget(pruner, keep, images)
    plans = []
    for item, image, mine in zip(items, images, picks, strict=True):
        try:
            plans.append(_plan(vlm, item, image, mine, policy))
        except ItemError as err:
            plans.append(err)
    return plans


def _crops(layout: Layout, anyres: str) -> list[Crop]:
    if anyres == "per_crop" or len(layout.crops) == 1:
        return layout.crops
    index = torch.cat([c.index for c in layout.crops]).sort().values
    return [Crop(index, None)]


def _text_embeddings(vlm: VLM, item: PreparedItem) -> torch.Tensor | None:
    """One LLM input embedding per content word (mean over its sub-word tokens)."""
    words = [ids for ids in item.relevance_token_ids if ids]
    if not words:
        return None
    table = vlm.model.get_input_embeddings()
    rows = [table(torch.tensor(ids, device=vlm.device)).float().mean(0) for ids in words]
    return torch.stack(rows)


def _plan(vlm: VLM, item, image: ImageTokens, chosen: Picks, policy: str) -> _Plan:
    """Cut the item's image-token run to the kept tokens; positions and stats follow."""
    feat = image.features
    kept = kept_index(chosen)
    parts = [p.tokens if p.tokens is not None else s.tokens[p.indices] for c, s, p in chosen]
    newlines = kept_rows(image, kept)
    order = torch.cat([kept, torch.tensor(newlines, dtype=torch.long)]).argsort()
    extra = feat[torch.tensor(newlines, dtype=torch.long, device=feat.device)]
    features = torch.cat([*parts, extra]).to(vlm.model.dtype)[order.to(feat.device)]
    kept_all = torch.cat([kept, torch.tensor(newlines, dtype=torch.long)])[order]
    ids = torch.from_numpy(item.input_ids).to(vlm.device)
    run = torch.nonzero(ids == vlm.model.config.image_token_id).flatten()
    if len(run) != feat.shape[0]:
        raise ItemError("image_tokens", f"{len(run)} image tokens for {feat.shape[0]} features")
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[run] = False
    keep[run[kept_all.to(vlm.device)]] = True
    positions = vlm.adapter.positions(vlm.model, ids, item, keep, policy)
    stats = _stats(feat, kept_all, len(newlines), chosen, ids, keep)
    return _Plan(ids[keep], features, positions, stats)


def _stats(feat, kept_all, n_newlines, chosen, ids, keep) -> dict:
    energy = [float(s.tokens.float().pow(2).sum()) for _, s, _ in chosen]
    retained = sum(e * p.retained_energy for e, (_, _, p) in zip(energy, chosen, strict=True))
    rel = [p.relevance.float() for _, _, p in chosen if p.relevance is not None]
    r = torch.cat(rel) if rel else None
    return {
        "visual_tokens": int(feat.shape[0]),
        "kept_tokens": len(kept_all),
        "kept_newlines": n_newlines,
        "kept_indices": kept_all.tolist(),
        "retained_energy": retained / sum(energy) if sum(energy) > 0 else 1.0,
        "relevance_mean": float(r.mean()) if r is not None else None,
        "relevance_max": float(r.max()) if r is not None else None,
        "prompt_tokens": int(keep.sum()),
        "prompt_tokens_unpruned": int(ids.shape[0]),
    }


def _fits(vlm: VLM, plan: _Plan, max_new_tokens: int) -> ItemError | None:
    """prompt_too_long when the prompt's positions plus the new tokens exceed the context."""
    context = vlm.model.config.text_config.max_position_embeddings
    span = int(plan.positions.max()) + 1
    if span + max_new_tokens <= context:
        return None
    return ItemError(
        "prompt_too_long",
        f"prompt spans {span} positions + {max_new_tokens} new tokens > context {context}",
    )


def _generate(vlm: VLM, plans: list[_Plan], max_new_tokens: int) -> list[tuple[str, list[int]]]:
    """One left-padded greedy ``generate`` over the kept sequences; (answer, ids up to EOS)."""
    ids, mask, positions = _left_pad(vlm, plans)
    model = vlm.model
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
        pad_token_id=_pad_id(vlm),
    )
    new = out[:, ids.shape[1] :].cpu()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    answers = []
    for row in new.tolist():
        n = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
        answers.append((vlm.tokenizer.decode(row[:n], skip_special_tokens=True).strip(), row[:n]))
    return answers


def _left_pad(vlm: VLM, plans: list[_Plan]) -> tuple[torch.Tensor, ...]:
    """Left-pad ids, mask and positions; pads get position 0, as stock ``generate`` does."""
    b, length, rows = len(plans), max(len(p.ids) for p in plans), plans[0].positions.shape[0]
    ids = torch.full((b, length), _pad_id(vlm), dtype=torch.long, device=vlm.device)
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


def _pad_id(vlm: VLM) -> int:
    pad = vlm.tokenizer.pad_token_id
    return pad if pad is not None else vlm.model.generation_config.eos_token_id
