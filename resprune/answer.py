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

import itertools
import time
from dataclasses import dataclass

import numpy as np
import torch

from resprune import overhead
from resprune.adaptive import select_by_energy
from resprune.budget import (
    ImageTokens,
    Picks,
    kept_index,
    kept_rows,
    select_within_budget,
)
from resprune.engines import Engine, Plan
from resprune.engines.hf import TransformersEngine
from resprune.host import to_device, to_host
from resprune.items import ItemError, ItemResult, PreparedItem
from resprune.keep import EnergyKeep
from resprune.models.base import POSITION_POLICIES, VLM, Crop, Layout, sync
from resprune.pruners import Pruner, build_pruner

ANYRES_MODES = ("per_crop", "global")


@dataclass
class _Plan:
    """One item after selection: what the engine gets, the prompt's span, its stats."""

    engine: Plan  # kept ids, features and positions (device views of batch-wide tensors)
    span: int  # positions the prompt spans (its largest position + 1), from the host
    stats: dict  # the host-side stats; retained_energy and relevance come after generation


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
    built once per VLM). Host and device cross a fixed number of times per batch, whatever
    its size (`resprune.host`): the images in, the pruner's picks out (one read), the kept
    sequences in (one copy), the answers out, then the statistics out (one read, once the
    device is idle).
    """
    if position_policy not in POSITION_POLICIES:
        raise ValueError(f"position_policy must be one of {POSITION_POLICIES}")
    if anyres not in ANYRES_MODES:
        raise ValueError(f"anyres must be one of {ANYRES_MODES}, got {anyres!r}")
    if not items:
        return []
    pruner = pruner or build_pruner("none")
    engine = engine or _default_engine(vlm)
    for dtype in dict.fromkeys((vlm.model.dtype, torch.float32)):  # the model's, the Gram's
        overhead.warm_libraries(vlm.device, dtype)
    with torch.inference_mode():
        t0 = _now(vlm)
        encoded = vlm.adapter.encode(vlm.model, items)
        t1 = _now(vlm)
        images, picks = _select(vlm, items, encoded.features, pruner, keep, anyres)
        plans = _plans(vlm, items, images, picks, position_policy, encoded.side)
        t2 = _now(vlm)
        out: list[ItemResult | ItemError | None] = [
            p if isinstance(p, ItemError) else _fits(vlm, p, max_new_tokens) for p in plans
        ]
        ok = [i for i, r in enumerate(out) if r is None]
        answers = engine.generate([plans[i].engine for i in ok], max_new_tokens) if ok else []
        t3 = _now(vlm)
        device_stats = _device_stats([picks[i] for i in ok])
    stages = zip(("vision_s", "select_s", "generate_s"), (t0, t1, t2), (t1, t2, t3), strict=True)
    share = {key: _model_time(a, b) / len(items) for key, a, b in stages}
    for i, gen, more in zip(ok, answers, device_stats, strict=True):
        stats = plans[i].stats | more
        out[i] = gen if isinstance(gen, ItemError) else _result(gen, stats, share)
    return out  # type: ignore[return-value]


def _default_engine(vlm: VLM) -> Engine:
    if vlm.default_engine is None:
        vlm.default_engine = TransformersEngine(vlm)
    return vlm.default_engine  # type: ignore[return-value]


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


def _select(vlm, items, feats, pruner, keep, anyres) -> tuple[list[ImageTokens], list[Picks]]:
    """One pruner call over every crop of every item (within budget)."""
    layouts = [
        vlm.adapter.layout(vlm.model, it, f.shape[0]) for it, f in zip(items, feats, strict=True)
    ]
    texts = _text_embeddings(vlm, items)
    images = [
        ImageTokens(feat, _crops(lay, anyres), lay.newline_rows, text, item.item_id)
        for item, feat, lay, text in zip(items, feats, layouts, texts, strict=True)
    ]
    if isinstance(keep, EnergyKeep):
        return images, select_by_energy(pruner, keep, images)
    return images, select_within_budget(pruner, keep, images)


def _crops(layout: Layout, anyres: str) -> list[Crop]:
    if anyres == "per_crop" or len(layout.crops) == 1:
        return layout.crops
    index = np.sort(np.concatenate([c.index.numpy() for c in layout.crops]))
    return [Crop(torch.from_numpy(index), None)]


def _text_embeddings(vlm: VLM, items: list[PreparedItem]) -> list[torch.Tensor | None]:
    """Per item, one LLM input embedding per content word (mean over its sub-word tokens),
    for the whole batch with one host-to-device copy of the word ids."""
    words = [[ids for ids in item.relevance_token_ids if ids] for item in items]
    flat = [w for ws in words for w in ws]
    if not flat:
        return [None] * len(items)
    longest = max(len(w) for w in flat)
    ids = np.zeros((len(flat), longest + 1), dtype=np.int64)  # last column: sub-word count
    for j, w in enumerate(flat):
        ids[j, : len(w)], ids[j, -1] = w, len(w)
    both = to_device(ids, vlm.device)
    lengths = both[:, -1:]
    valid = torch.arange(longest, device=vlm.device) < lengths
    table = vlm.model.get_input_embeddings()
    rows = (table(both[:, :-1]).float() * valid[..., None]).sum(1) / lengths
    bounds = np.cumsum([0, *(len(ws) for ws in words)]).tolist()
    return [rows[a:b] if b > a else None for a, b in itertools.pairwise(bounds)]


def _plans(vlm, items, images, picks, policy, side) -> list[_Plan | ItemError]:
    """Every item's kept sequence, cut on the host; then one copy of all kept ids, positions,
    unpruned ids, feature rows, side rows and token extras to the device, and one gather of
    the kept features (and of their side rows, by the same kept index)."""
    cuts: list[_Cut | ItemError] = []
    sources: list[torch.Tensor] = []  # rows the kept features are gathered from
    sides: list[torch.Tensor] = []  # the side rows of the items cut, in the same order
    offset = side_offset = 0
    for i, (item, image, mine) in enumerate(zip(items, images, picks, strict=True)):
        feat = image.features
        try:
            cut = _cut(vlm, item, image, mine, policy, offset)
        except ItemError as err:
            cuts.append(err)
            continue
        cuts.append(cut)
        sources += [feat, *cut.replaced]
        offset += feat.shape[0] + sum(t.shape[0] for t in cut.replaced)
        if side is not None:  # pool's replacement tokens take their windows' centres' rows
            cut.side_rows = side_offset + cut.side_rows
            sides.append(side[i])
            side_offset += side[i].shape[0]
    done = [c for c in cuts if isinstance(c, _Cut)]
    if not done:
        return cuts  # type: ignore[return-value]
    arrays = [c.arrays() for c in done]
    sizes = [len(a) for arrs in arrays for a in arrs]
    flat = iter(
        to_device(np.concatenate([a for arrs in arrays for a in arrs]), vlm.device).split(sizes)
    )
    device = [[next(flat) for _ in arrs] for arrs in arrays]
    features = _gather(sources, [d[0] for d in device], vlm.model.dtype)
    kept_side = _gather(sides, [d[4] for d in device], vlm.model.dtype) if sides else None
    engine = iter(
        Plan(
            d[1],
            feat,
            d[2].view(c.positions.shape),
            d[3],
            kept_side[j] if kept_side is not None else None,
            dict(zip(c.extras, d[5:], strict=True)),
        )
        for j, (c, d, feat) in enumerate(zip(done, device, features, strict=True))
    )
    return [c if isinstance(c, ItemError) else _Plan(next(engine), c.span, c.stats) for c in cuts]


def _gather(sources: list[torch.Tensor], rows: list[torch.Tensor], dtype) -> list[torch.Tensor]:
    """Per item, its ``rows`` of the batch's concatenated ``sources`` (one gather)."""
    source = torch.cat(sources) if len(sources) > 1 else sources[0]
    return list(source[torch.cat(rows)].to(dtype).split([len(r) for r in rows]))


@dataclass
class _Cut:
    """One item's kept sequence on the host (see `_cut`)."""

    rows: np.ndarray  # rows of the batch's feature source, in sequence order
    ids: np.ndarray  # kept prompt ids
    positions: np.ndarray  # [R, L'] of the kept prompt
    prompt: np.ndarray  # the unpruned prompt ids
    replaced: list[torch.Tensor]  # replacement features (pool), appended to the source
    span: int
    stats: dict
    side_rows: np.ndarray  # kept visual positions (sequence order): the side rows to gather
    extras: dict[str, np.ndarray]  # the adapter's per-token inputs of the kept prompt

    def arrays(self) -> list[np.ndarray]:
        """Every int64 array the device needs, in `_plans`' order."""
        fixed = [self.rows, self.ids, self.positions.ravel(), self.prompt, self.side_rows]
        return fixed + [np.asarray(v, dtype=np.int64) for v in self.extras.values()]


def _cut(vlm, item, image: ImageTokens, chosen: Picks, policy: str, offset: int) -> _Cut:
    """Cut the item's image-token run to the kept tokens (host arithmetic only); ``offset``
    is where this item's features start in the batch's feature source."""
    kept = kept_index(chosen)
    newlines = kept_rows(image, kept)
    n = image.features.shape[0]
    rows, replaced, extra, at = [], [], offset + n, 0
    for _, _, p in chosen:
        if p.tokens is not None:  # the pool baseline's replacement features
            rows.append(np.arange(extra, extra + p.tokens.shape[0]))
            replaced.append(p.tokens)
            extra += p.tokens.shape[0]
        else:  # this pick's slice of `kept` (read from the device once, above)
            rows.append(offset + kept[at : at + len(p.indices)])
        at += len(p.indices)
    position = np.concatenate([kept, np.asarray(newlines, dtype=np.int64)])
    order = np.argsort(position, kind="stable")
    rows = np.concatenate([*rows, offset + np.asarray(newlines, dtype=np.int64)])[order]
    kept_all = position[order]
    ids = item.input_ids
    run = np.flatnonzero(ids == vlm.model.config.image_token_id)
    if len(run) != n:
        raise ItemError("image_tokens", f"{len(run)} image tokens for {n} features")
    keep = np.ones(len(ids), dtype=bool)
    keep[run] = False
    keep[run[kept_all]] = True
    positions = vlm.adapter.positions(vlm.model, item, keep, policy)
    extras = vlm.adapter.token_extras(vlm.model, item, keep)
    stats = {
        "visual_tokens": n,
        "kept_tokens": len(kept_all),
        "kept_newlines": len(newlines),
        "kept_indices": kept_all.tolist(),
        "prompt_tokens": int(keep.sum()),
        "prompt_tokens_unpruned": len(ids),
    }
    span = int(positions.max()) + 1
    return _Cut(rows, ids[keep], positions, ids, replaced, span, stats, kept_all, extras)


def _device_stats(picks: list[Picks]) -> list[dict]:
    """Per item, the stats that need device values (each crop's token energy, the relevance),
    read in one go: called after generation, when the device is idle anyway."""
    values: list[torch.Tensor] = []
    for mine in picks:
        values += [s.tokens.float().pow(2).sum() for _, s, _ in mine]
        rel = [p.relevance.float() for _, _, p in mine if p.relevance is not None]
        if rel:
            r = torch.cat(rel)
            values += [r.mean(), r.max()]
    host = iter(to_host(torch.stack(values))[0].tolist() if values else [])
    stats = []
    for mine in picks:
        energy = [next(host) for _ in mine]
        retained = sum(e * p.retained_energy for e, (_, _, p) in zip(energy, mine, strict=True))
        with_rel = any(p.relevance is not None for _, _, p in mine)
        mean, top = (next(host), next(host)) if with_rel else (None, None)
        stats.append(
            {
                "retained_energy": retained / sum(energy) if sum(energy) > 0 else 1.0,
                "relevance_mean": mean,
                "relevance_max": top,
            }
        )
    return stats


def _fits(vlm: VLM, plan: _Plan, max_new_tokens: int) -> ItemError | None:
    """prompt_too_long when the prompt's positions plus the new tokens exceed the context."""
    context = vlm.model.config.text_config.max_position_embeddings
    span = plan.span
    if span + max_new_tokens <= context:
        return None
    return ItemError(
        "prompt_too_long",
        f"prompt spans {span} positions + {max_new_tokens} new tokens > context {context}",
    )
