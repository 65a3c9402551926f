"""Summable per-run statistics of result rows (datatrove-style: records with `+`).

`RunStats.from_rows` reduces one run's rows to sums, counts and fixed-bin histograms; a night,
a GPU type or the whole prefix is the `sum()` of its runs. GPU seconds are also summed per
batch-size bucket (the stratified estimate needs them), and failed attempts apart. Only the
shadow sample is kept in detail (it is small, ~1%): its items for the worst-disagreement
list, its batches (summed per batch: items of one batch share one time) for the bootstrap.
Non-goals: ratios, intervals and money (see `estimate.py` and `summary.py`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from pipeline.report.estimate import LlmShape, ShadowBatches, generation_flops, size_bucket

STAGES = ("preprocess_s", "vision_s", "select_s", "generate_s")
BINS = np.linspace(0.0, 1.0, 21)  # fixed edges keep histograms summable
SHADOW_FIELDS = ("ids", "questions", "answers", "shadow_answers", "batches")


def _nansum(values: np.ndarray) -> float:
    return float(np.nansum(values)) if len(values) else 0.0


def _hist(values: np.ndarray) -> np.ndarray:
    values = values[np.isfinite(values)]
    return np.histogram(np.clip(values, 0.0, 1.0), bins=BINS)[0]


@dataclass
class Shadow:
    """The shadow sample: its items (ids, both answers) and its batches (both GPU times)."""

    ids: np.ndarray = field(default_factory=lambda: np.empty(0, object))
    questions: np.ndarray = field(default_factory=lambda: np.empty(0, object))
    answers: np.ndarray = field(default_factory=lambda: np.empty(0, object))
    shadow_answers: np.ndarray = field(default_factory=lambda: np.empty(0, object))
    batches: ShadowBatches = field(default_factory=ShadowBatches)

    def __add__(self, other: Shadow) -> Shadow:
        items = (np.concatenate([getattr(self, f), getattr(other, f)]) for f in SHADOW_FIELDS[:4])
        return Shadow(*items, batches=self.batches + other.batches)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class RunStats:
    """Sums over one or more runs' rows; `a + b` merges, `sum(parts, RunStats())` too."""

    items_ok: int = 0
    items_error: int = 0
    gpu_seconds: float = 0.0  # answered items' device time (the pruned work itself)
    failed_seconds: float = 0.0  # device time of attempts that failed (counted as used)
    bucket_seconds: Counter = field(default_factory=Counter)  # gpu_seconds by batch-size bucket
    stage_seconds: Counter = field(default_factory=Counter)
    errors_by_cause: Counter = field(default_factory=Counter)
    token_items: int = 0
    visual_tokens: float = 0.0
    kept_tokens: float = 0.0
    prompt_tokens: float = 0.0
    prompt_tokens_unpruned: float = 0.0
    energy_items: int = 0
    energy_sum: float = 0.0
    energy_hist: np.ndarray = field(default_factory=lambda: np.zeros(len(BINS) - 1, np.int64))
    keep_hist: np.ndarray = field(default_factory=lambda: np.zeros(len(BINS) - 1, np.int64))
    kept_counts: Counter = field(default_factory=Counter)  # kept tokens per item -> items
    flops_pruned: float | None = 0.0
    flops_unpruned: float | None = 0.0
    shadow: Shadow = field(default_factory=Shadow)
    shadow_failed_batches: int = 0  # twins that failed (recorded, left out of the ratio)

    def __add__(self, other: RunStats) -> RunStats:
        merged = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            merged[f.name] = None if a is None or b is None else a + b
        return RunStats(**merged)

    def __radd__(self, other: Any) -> RunStats:
        return self if other == 0 else NotImplemented

    @property
    def used_seconds(self) -> float:
        """GPU seconds used: answered items plus failed attempts."""
        return self.gpu_seconds + self.failed_seconds

    @classmethod
    def from_rows(cls, cols: dict[str, np.ndarray], shape: LlmShape | None = None) -> RunStats:
        """Reduce one run's rows; FLOPs are None when the model shape is unknown."""
        ok = cols["status"] == "ok"
        causes = [str(c) if c else "unknown" for c in cols["error_cause"][~ok]]
        stats = cls(
            items_ok=int(ok.sum()),
            items_error=int((~ok).sum()),
            gpu_seconds=_nansum(cols["gpu_seconds"]),
            failed_seconds=_nansum(cols["failed_gpu_seconds"]),
            bucket_seconds=_bucket_seconds(cols),
            stage_seconds=Counter(
                {s: _nansum(cols[s]) for s in STAGES if np.isfinite(cols[s]).any()}
            ),
            errors_by_cause=Counter(causes),
            shadow=_shadow(cols, ok),
            shadow_failed_batches=_failed_twins(cols),
        )
        _add_tokens(stats, cols, ok)
        _add_flops(stats, cols, ok, shape or LlmShape())
        return stats


def _add_tokens(stats: RunStats, cols: dict[str, np.ndarray], ok: np.ndarray) -> None:
    visual, kept = cols["visual_tokens"], cols["kept_tokens"]
    have = ok & np.isfinite(visual) & np.isfinite(kept) & (visual > 0)
    stats.token_items = int(have.sum())
    stats.visual_tokens, stats.kept_tokens = _nansum(visual[have]), _nansum(kept[have])
    stats.keep_hist = _hist(kept[have] / visual[have])
    stats.kept_counts = Counter(int(k) for k in kept[have])  # exact, summable: any bins later
    prompt, unpruned = cols["prompt_tokens"], cols["prompt_tokens_unpruned"]
    both = ok & np.isfinite(prompt) & np.isfinite(unpruned)
    stats.prompt_tokens, stats.prompt_tokens_unpruned = (
        _nansum(prompt[both]),
        _nansum(unpruned[both]),
    )
    energy = cols["retained_energy"][ok]
    energy = energy[np.isfinite(energy)]
    stats.energy_items, stats.energy_sum, stats.energy_hist = (
        len(energy),
        _nansum(energy),
        _hist(energy),
    )


def _add_flops(
    stats: RunStats, cols: dict[str, np.ndarray], ok: np.ndarray, shape: LlmShape
) -> None:
    prompt, unpruned, new = (
        cols["prompt_tokens"],
        cols["prompt_tokens_unpruned"],
        cols["new_tokens"],
    )
    have = ok & np.isfinite(prompt) & np.isfinite(unpruned) & np.isfinite(new)
    new_unpruned = np.where(np.isfinite(cols["shadow_new_tokens"]), cols["shadow_new_tokens"], new)
    pruned = generation_flops(shape, prompt[have], new[have])
    full = generation_flops(shape, unpruned[have], new_unpruned[have])
    if pruned is None or full is None or not have.any():
        stats.flops_pruned = stats.flops_unpruned = None if pruned is None else 0.0
        return
    stats.flops_pruned, stats.flops_unpruned = float(pruned.sum()), float(full.sum())


def _bucket_seconds(cols: dict[str, np.ndarray]) -> Counter:
    gpu = cols["gpu_seconds"]
    have = np.isfinite(gpu)
    buckets = size_bucket(cols["batch_size"][have])
    return Counter({int(b): float(gpu[have][buckets == b].sum()) for b in np.unique(buckets)})


def _shadow(cols: dict[str, np.ndarray], ok: np.ndarray) -> Shadow:
    pruned, unpruned = cols["gpu_seconds"], cols["shadow_gpu_seconds"]
    use = cols["shadow"] & ok & np.isfinite(pruned) & np.isfinite(unpruned)
    use &= np.array([a is not None for a in cols["shadow_answer"]], bool)
    pick = {
        "ids": "id",
        "questions": "question",
        "answers": "answer",
        "shadow_answers": "shadow_answer",
    }
    arrays = {k: cols[c][use] for k, c in pick.items()}
    return Shadow(**arrays, batches=_batches({k: v[use] for k, v in cols.items()}))


def _failed_twins(cols: dict[str, np.ndarray]) -> int:
    """Shadow batches whose unpruned twin failed (by batch id; a row without one alone)."""
    failed = np.array([e is not None for e in cols["shadow_error"]], bool)
    pairs = zip(cols["batch_id"][failed], cols["id"][failed], strict=True)
    keys = {f"b:{b}" if b else f"i:{i}" for b, i in pairs}
    return len(keys)


def _batches(cols: dict[str, np.ndarray]) -> ShadowBatches:
    """Shadow rows summed per model batch (rows without a batch id are their own batch)."""
    keys = [f"b:{b}" if b else f"i:{i}" for b, i in zip(cols["batch_id"], cols["id"], strict=True)]
    if not keys:
        return ShadowBatches()
    _, first, inverse = np.unique(np.array(keys), return_index=True, return_inverse=True)
    pruned = np.bincount(inverse, weights=cols["gpu_seconds"])
    unpruned = np.bincount(inverse, weights=cols["shadow_gpu_seconds"])
    run = np.array([str(r) if r else "unknown" for r in cols["run_id"][first]], dtype=object)
    keep = pruned > 0
    bucket = size_bucket(cols["batch_size"][first])
    return ShadowBatches(pruned[keep], unpruned[keep], bucket[keep], run[keep])


def split_by_run(cols: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Rows grouped by run_id (rows without one under "unknown")."""
    run_ids = np.array([str(r) if r else "unknown" for r in cols["run_id"]], dtype=object)
    return {rid: {k: v[run_ids == rid] for k, v in cols.items()} for rid in dict.fromkeys(run_ids)}
