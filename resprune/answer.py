"""Answer a batch of prepared (image, question) items with visual-token pruning before the LLM.

Per batch: one vision-tower call; one pruner call over every crop of every item (selection
is per image or crop, never normalised across the batch); then each prompt's image-token
run and positions are cut to the kept tokens, and the kept sequences go to a generation
engine (`resprune.engines`; default: the VLM's own transformers ``generate`` with the kept
features as ``mm_encoder_outputs``). ``keep`` bounds all the LLM sees of an image, layout
rows included (`resprune.budget`), or asks for the energy it retains (`resprune.adaptive`).
No attention maps are needed, so SDPA / FlashAttention keep working. Timings are per batch,
synchronised with the device, and reported per item as
the batch time divided by the batch size (``generate_s`` is the engine call, whatever the
engine, so cost reports stay comparable); compile and capture time (`resprune.overhead`: a
new shape's warm-up) is left out of every stage.
Non-goals: sampling (decoding is greedy), streaming, multi-image prompts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from resprune import overhead
from resprune.adaptive import select_by_energy
from resprune.budget import ImageTokens, Picks, kept_index, kept_rows, select_within_budget
from resprune.engines import Engine, Plan
from resprune.engines.hf import TransformersEngine
from resprune.items import ItemError, ItemResult, PreparedItem
from resprune.keep import EnergyKeep
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
    keep: int | float | EnergyKeep,
    max_new_tokens: int,
    position_policy: str = "original",
    anyres: str = "per_crop",
    engine: Engine | None = None,
) -> list[ItemResult | ItemError]:
    """Answer ``items`` in one batch; an item-level failure is an ItemError in its slot.

    ``engine`` generates from the kept sequences (default: the VLM's transformers engine,
    built once per VLM).
    """
    if position_policy not in POSITION_POLICIES:
        raise ValueError(f"position_policy must be one of {POSITION_POLICIES}")
    if anyres not in ANYRES_MODES:
        raise ValueError(f"anyres must be one of {ANYRES_MODES}, got {anyres!r}")
    if not items:
        return []
    pruner = pruner or build_pruner("none")
    engine = engine or _default_engine(vlm)
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
        todo = [_engine_plan(plans[i], items[i]) for i in ok]
        answers = engine.generate(todo, max_new_tokens) if ok else []
        t3 = _now(vlm)
    stages = zip(("vision_s", "select_s", "generate_s"), (t0, t1, t2), (t1, t2, t3), strict=True)
    share = {key: _model_time(a, b) / len(items) for key, a, b in stages}
    for i, gen in zip(ok, answers, strict=True):
        out[i] = gen if isinstance(gen, ItemError) else _result(gen, plans[i].stats, share)
    return out  # type: ignore[return-value]


def _default_engine(vlm: VLM) -> Engine:
    if vlm.default_engine is None:
        vlm.default_engine = TransformersEngine(vlm)
    return vlm.default_engine  # type: ignore[return-value]


def _engine_plan(plan: _Plan, item: PreparedItem) -> Plan:
    prompt = torch.from_numpy(item.input_ids).to(plan.ids.device)
    return Plan(plan.ids, plan.features, plan.positions, prompt)


def _result(gen, stats: dict, share: dict) -> ItemResult:
    ids = gen.token_ids
    return ItemResult(answer=gen.text, answer_ids=ids, new_tokens=len(ids), **stats, **share)


def _now(vlm: VLM) -> tuple[float, float]:
    """(wall clock, compile and capture seconds so far), the device synchronised."""
    sync(vlm.device)
    return time.perf_counter(), overhead.seconds()


def _model_time(start: tuple[float, float], end: tuple[float, float]) -> float:
    """Seconds between two `_now` readings, less the compile and capture time between them."""
    return max(0.0, (end[0] - start[0]) - (end[1] - start[1]))


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
    if isinstance(keep, EnergyKeep):
        picks = select_by_energy(pruner, keep, images)
    else:
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
