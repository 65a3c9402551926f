"""Pure estimators behind the cost report: numbers in, numbers out; no I/O, no formatting.

- Measured time ratio on the shadow sample (sum of unpruned GPU seconds over sum of pruned
  GPU seconds, same batches, same actor), one per batch-size bucket applied to that bucket's
  GPU seconds, with a seeded percentile bootstrap over whole batches (and runs), widened to
  at least a Student-t interval of the ratio (few batches: wide; one batch: none).
- A FLOPs model of the LLM (prefill with causal attention, decode, LM head) from the run's
  `model_shape`, as a cross-check: it assumes time proportional to FLOPs, which overstates
  savings where decode is memory-bound.
- Answer agreement between pruned and unpruned answers (exact match, SQuAD-style token F1).
Non-goals: GPU prices or peak-FLOPs tables (unknown stays unknown; see practice 10).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.report.overlap import overlap_f1

N_BOOT = 2000
MIN_BATCHES = 3  # shadow batches a batch-size bucket needs to use its own ratio
_BOOT_CELLS = 4_000_000  # resample indices drawn per chunk (bounds memory)
_NON_WORD = re.compile(r"[^\w\s]|_")


# Student t, 97.5th percentile, 1..30 degrees of freedom
_T975 = tuple(
    float(t)
    for t in (
        "12.706 4.303 3.182 2.776 2.571 2.447 2.365 2.306 2.262 2.228 2.201 2.179 2.160 2.145 "
        "2.131 2.120 2.110 2.101 2.093 2.086 2.080 2.074 2.069 2.064 2.060 2.056 2.052 2.048 "
        "2.045 2.042"
    ).split()
)
_Z975 = 1.959964


def t975(df: int) -> float:
    """The Student-t 97.5th percentile (a table to 30, a Cornish-Fisher term above)."""
    if df <= len(_T975):
        return _T975[df - 1]
    return _Z975 + (_Z975**3 + _Z975) / (4 * df)


def ratio_interval(pruned_s: np.ndarray, unpruned_s: np.ndarray) -> tuple[float, float] | None:
    """95 % Student-t interval of the ratio estimator sum(u) / sum(p) over n batches
    (linearised: residuals u_i - R p_i, n - 1 degrees of freedom), clipped at 0; None below two
    batches. It widens as the sample shrinks (t = 12.7 at two batches), where a bootstrap of
    a handful of batches is far too narrow."""
    p, u = np.asarray(pruned_s, float), np.asarray(unpruned_s, float)
    n = len(p)
    if n < 2 or p.sum() <= 0:
        return None
    r = u.sum() / p.sum()
    se = np.sqrt(np.sum((u - r * p) ** 2) / (n * (n - 1))) / p.mean()
    half = t975(n - 1) * float(se)
    return max(0.0, r - half), r + half


def time_ratio(pruned_s: np.ndarray, unpruned_s: np.ndarray) -> float | None:
    """Sum of unpruned over sum of pruned seconds; None without positive pruned time."""
    total = float(np.sum(pruned_s))
    return float(np.sum(unpruned_s)) / total if len(pruned_s) and total > 0 else None


@dataclass(frozen=True)
class ShadowBatches:
    """The shadow sample as clusters: one entry per model batch (its items share one time).

    ``bucket`` is the batch-size bucket of the pruned batch (see `size_bucket`), ``run`` the
    run it belongs to; the bootstrap resamples runs, then batches within them.
    """

    pruned_s: np.ndarray = field(default_factory=lambda: np.empty(0))
    unpruned_s: np.ndarray = field(default_factory=lambda: np.empty(0))
    bucket: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    run: np.ndarray = field(default_factory=lambda: np.empty(0, object))

    def __add__(self, other: ShadowBatches) -> ShadowBatches:
        return ShadowBatches(
            *(np.concatenate([getattr(self, f), getattr(other, f)]) for f in _BATCH_FIELDS)
        )

    def __len__(self) -> int:
        return len(self.pruned_s)


_BATCH_FIELDS = ("pruned_s", "unpruned_s", "bucket", "run")


def size_bucket(sizes: np.ndarray) -> np.ndarray:
    """Batch-size bucket: the largest power of two <= the size; 0 when the size is unknown."""
    sizes = np.asarray(sizes, float)
    known = np.isfinite(sizes) & (sizes >= 1)
    out = np.zeros(len(sizes), np.int64)
    out[known] = 2 ** np.floor(np.log2(sizes[known])).astype(np.int64)
    return out


def bucket_label(bucket: int) -> str:
    """Batch sizes a bucket holds, e.g. "4-7"; "unknown" for 0."""
    if bucket <= 0:
        return "unknown"
    return "1" if bucket == 1 else f"{bucket}-{2 * bucket - 1}"


@dataclass(frozen=True)
class Stratified:
    """Unpruned seconds from one ratio per batch-size bucket, with bootstrap draws."""

    estimate_s: float | None
    buckets: list[dict[str, Any]]  # bucket, label, seconds, shadow_batches, ratio, own
    boots_s: np.ndarray | None


def stratified_unpruned(
    seconds: Mapping[int, float], shadow: ShadowBatches, *, n_boot: int = N_BOOT, seed: int = 0
) -> Stratified:
    """Each bucket's GPU seconds times the ratio measured on that bucket's shadow batches.

    A bucket with fewer than `MIN_BATCHES` shadow batches (or none) takes the pooled ratio of
    all shadow batches. The bootstrap resamples runs, then whole batches within each drawn
    run (items of one batch share one time, so they are never resampled apart).
    """
    keys = np.array(sorted(seconds), np.int64)
    if not len(shadow) or float(shadow.pruned_s.sum()) <= 0 or not len(keys):
        return Stratified(None, [], None)
    used = np.array([seconds[k] for k in keys], float)
    counts = (shadow.bucket[:, None] == keys[None, :]).sum(axis=0)
    own = counts >= MIN_BATCHES
    total, ratios = _unpruned_draws(np.ones((1, len(shadow))), shadow, keys, used, own)
    rows = [
        {
            "bucket": int(k),
            "label": bucket_label(int(k)),
            "gpu_seconds": float(u),
            "shadow_batches": int(c),
            "ratio": float(r),
            "own_ratio": bool(o),
        }
        for k, u, c, r, o in zip(keys, used, counts, ratios[0], own, strict=True)
    ]
    boots = None
    if len(shadow) >= 2:
        chunks = _cluster_weights(shadow.run, n_boot, seed)
        boots = np.concatenate([_unpruned_draws(w, shadow, keys, used, own)[0] for w in chunks])
    return Stratified(float(total[0]), rows, boots)


def _cluster_weights(run: np.ndarray, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Chunks of bootstrap weights (draws x batches): runs drawn, then batches within runs."""
    rng = np.random.default_rng(seed)
    labels, index = np.unique(run.astype(str), return_inverse=True)
    members = [np.flatnonzero(index == r) for r in range(len(labels))]
    step = max(1, _BOOT_CELLS // len(run))
    for start in range(0, n_boot, step):
        size = min(step, n_boot - start)
        copies = rng.multinomial(len(labels), np.full(len(labels), 1 / len(labels)), size=size)
        weights = np.zeros((size, len(run)))
        for r, idx in enumerate(members):
            weights[:, idx] = _counts(rng, copies[:, r] * len(idx), len(idx))
        yield weights


def _counts(rng: np.random.Generator, draws: np.ndarray, m: int) -> np.ndarray:
    """Per row d, how often each of `m` batches is picked in `draws[d]` uniform draws."""
    width = int(draws.max()) if len(draws) else 0
    picks = rng.integers(0, m, size=(len(draws), width))
    valid = np.arange(width)[None, :] < draws[:, None]
    flat = (picks + m * np.arange(len(draws))[:, None])[valid]
    return np.bincount(flat, minlength=m * len(draws)).reshape(len(draws), m)


def _unpruned_draws(
    weights: np.ndarray,
    shadow: ShadowBatches,
    keys: np.ndarray,
    seconds: np.ndarray,
    own: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Unpruned seconds per draw (and the per-bucket ratios) for batch weights (draws x n)."""
    onehot = (shadow.bucket[:, None] == keys[None, :]).astype(float)
    times = np.column_stack([shadow.pruned_s, shadow.unpruned_s])
    parts = np.column_stack(
        [onehot * shadow.pruned_s[:, None], onehot * shadow.unpruned_s[:, None]]
    )
    # one product (per bucket, then pooled); einsum, not BLAS: for these thin products a BLAS
    # thread pool costs more than the arithmetic, badly so on a busy machine
    sums = np.einsum("dn,nk->dk", weights, np.column_stack([parts, times]))
    k = len(keys)
    pruned, unpruned = sums[:, :k], sums[:, k : 2 * k]
    pooled = sums[:, -1] / np.maximum(sums[:, -2], 1e-300)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(own & (pruned > 0), unpruned / pruned, pooled[:, None])
    return ratios @ seconds, ratios


def percentile_ci(samples: np.ndarray | None, level: float = 0.95) -> list[float] | None:
    """The central `level` percentile interval of bootstrap samples, or None."""
    if samples is None:
        return None
    tail = 100 * (1 - level) / 2
    return [float(np.percentile(samples, tail)), float(np.percentile(samples, 100 - tail))]


@dataclass(frozen=True)
class LlmShape:
    """The language model's size as far as the run summary knows it (fields may be None)."""

    hidden_size: int | None = None
    num_layers: int | None = None
    intermediate_size: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    vocab_size: int | None = None
    parameters: int | None = None

    @classmethod
    def from_dict(cls, shape: Mapping[str, Any] | None) -> LlmShape:
        """Build from a run summary's `model_shape` (unknown keys ignored)."""
        shape = shape or {}
        aliases = {
            "num_layers": ("num_layers", "num_hidden_layers"),
            "num_heads": ("num_heads", "num_attention_heads"),
            "num_kv_heads": ("num_kv_heads", "num_key_value_heads"),
            "vocab_size": ("vocab_size", "vocab"),
            "parameters": ("text_parameters", "parameters"),  # the LLM's own, when known
        }
        values = {}
        for name in cls.__dataclass_fields__:
            keys = aliases.get(name, (name,))
            found = next((shape[k] for k in keys if isinstance(shape.get(k), int | float)), None)
            values[name] = int(found) if found else None
        return cls(**values)

    def linear_flops_per_token(self) -> float | None:
        """FLOPs of the decoder's matmuls for one token (2 per multiply-add), LM head excluded."""
        h, layers, ff = self.hidden_size, self.num_layers, self.intermediate_size
        if h and layers and ff:
            q = self.query_width() or h
            heads, kv_heads = self.num_heads, self.num_kv_heads
            kv = q * kv_heads / heads if heads and kv_heads else q
            return 2.0 * layers * (2 * h * q + 2 * h * kv + 3 * h * ff)  # q,o + k,v + gated MLP
        return 2.0 * self.parameters if self.parameters else None

    def query_width(self) -> int | None:
        """Heads x head_dim (Gemma 3's differs from its hidden size), else the hidden size."""
        if self.num_heads and self.head_dim:
            return self.num_heads * self.head_dim
        return self.hidden_size

    def attention_width(self) -> float | None:
        """layers x query width: the per-position cost unit of attention scores and values."""
        q = self.query_width()
        return float(self.num_layers * q) if self.num_layers and q else None


def generation_flops(shape: LlmShape, prompt: np.ndarray, new: np.ndarray) -> np.ndarray | None:
    """FLOPs per item to read `prompt` tokens and generate `new` ones; None if shape unknown."""
    linear = shape.linear_flops_per_token()
    if linear is None:
        return None
    prompt, new = np.asarray(prompt, float), np.asarray(new, float)
    steps = np.maximum(new - 1, 0)  # the prefill yields the first token
    flops = linear * (prompt + steps)
    width = shape.attention_width()
    if width is not None:
        flops += 2 * width * prompt * (prompt + 1)  # causal QK^T and AV: position i sees i
        flops += 4 * width * (steps * prompt + steps * (steps + 1) / 2)  # each step over the cache
    if shape.hidden_size and shape.vocab_size:
        flops += 2.0 * shape.hidden_size * shape.vocab_size * new
    return flops


def flops_scaled_seconds(
    seconds: float, stage_seconds: Mapping[str, float], flops_ratio: float
) -> tuple[float, str]:
    """Unpruned GPU seconds from a FLOPs ratio applied to the LLM stage's share of GPU time.

    Vision encoding is identical with and without pruning and the selector does not run
    unpruned; without stage timings the ratio scales all of the GPU time (says which).
    """
    vision, select, generate = (
        stage_seconds.get(k, 0.0) for k in ("vision_s", "select_s", "generate_s")
    )
    device = vision + select + generate
    if device <= 0:
        return seconds * flops_ratio, "all GPU time scaled (no stage timings)"
    share_select, share_generate = select / device, generate / device
    scaled = seconds * (1 - share_select - share_generate + share_generate * flops_ratio)
    return scaled, "generate stage scaled, vision kept, selector removed"


def normalize_answer(text: str | None) -> str:
    """Lower-case, punctuation to spaces, whitespace collapsed (Unicode-aware)."""
    text = unicodedata.normalize("NFKC", text or "").lower()
    return " ".join(_NON_WORD.sub(" ", text).split())


def token_f1(pruned: str | None, unpruned: str | None) -> float:
    """Token-overlap F1 of two normalised answers (1.0 when both are empty)."""
    return overlap_f1(normalize_answer(pruned).split(), normalize_answer(unpruned).split())


def agreement(pruned: Sequence[str | None], unpruned: Sequence[str | None]) -> dict[str, Any]:
    """Mean exact match and mean token F1 over answer pairs (None values when there are none)."""
    if not len(pruned):
        return {"exact_match": None, "token_f1": None, "n": 0}
    exact = [
        normalize_answer(a) == normalize_answer(b) for a, b in zip(pruned, unpruned, strict=True)
    ]
    f1 = [token_f1(a, b) for a, b in zip(pruned, unpruned, strict=True)]
    return {"exact_match": float(np.mean(exact)), "token_f1": float(np.mean(f1)), "n": len(f1)}
