"""The cost report's estimators against hand computations and independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.report.estimate import (
    LlmShape,
    ShadowBatches,
    agreement,
    flops_scaled_seconds,
    generation_flops,
    normalize_answer,
    percentile_ci,
    ratio_interval,
    size_bucket,
    stratified_unpruned,
    t975,
    time_ratio,
    token_f1,
)
from pipeline.report.stats import RunStats

SHAPE = LlmShape(
    hidden_size=64,
    num_layers=2,
    intermediate_size=128,
    num_heads=4,
    num_kv_heads=2,
    vocab_size=1000,
)


def test_time_ratio_is_a_ratio_of_sums() -> None:
    assert time_ratio(np.array([1.0, 3.0]), np.array([3.0, 5.0])) == pytest.approx(2.0)
    assert time_ratio(np.array([]), np.array([])) is None


def _one_bucket(pruned: np.ndarray, unpruned: np.ndarray) -> ShadowBatches:
    n = len(pruned)
    return ShadowBatches(pruned, unpruned, np.ones(n, np.int64), np.full(n, "r", object))


def _sample(n: int, seed: int) -> ShadowBatches:
    rng = np.random.default_rng(seed)
    pruned = rng.uniform(0.5, 1.5, n)
    return _one_bucket(pruned, pruned * rng.normal(2.0, 0.3, n))


def _ratio_ci(shadow: ShadowBatches, seed: int = 0) -> tuple[float, list[float]]:
    """The estimate for 1 s of used time: the ratio and its interval."""
    est = stratified_unpruned({1: 1.0}, shadow, seed=seed)
    return est.estimate_s, percentile_ci(est.boots_s)


def test_bootstrap_ci_shrinks_as_the_shadow_sample_grows() -> None:
    widths = []
    for n in (10, 100, 1000):
        shadow = _sample(n, seed=n)
        ratio, (lo, hi) = _ratio_ci(shadow)
        assert ratio == pytest.approx(time_ratio(shadow.pruned_s, shadow.unpruned_s))
        assert lo <= ratio <= hi
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]


def test_bootstrap_ci_matches_the_delta_method_for_a_large_sample() -> None:
    shadow = _sample(2000, seed=7)
    p, u = shadow.pruned_s, shadow.unpruned_s
    r = u.sum() / p.sum()
    se = math.sqrt(np.sum((u - r * p) ** 2)) / p.sum()  # linearised ratio SE
    _, (lo, hi) = _ratio_ci(shadow, seed=1)
    assert lo == pytest.approx(r - 1.96 * se, abs=0.25 * se)
    assert hi == pytest.approx(r + 1.96 * se, abs=0.25 * se)


def test_bootstrap_is_seeded_and_needs_two_batches() -> None:
    shadow = _sample(50, seed=3)
    a = stratified_unpruned({1: 1.0}, shadow, seed=5).boots_s
    assert np.array_equal(a, stratified_unpruned({1: 1.0}, shadow, seed=5).boots_s)
    one = _one_bucket(shadow.pruned_s[:1], shadow.unpruned_s[:1])
    assert stratified_unpruned({1: 1.0}, one).boots_s is None
    assert percentile_ci(None) is None


TRUE_RATIO = {1: 3.0, 2: 2.6, 4: 2.0, 8: 1.6, 16: 1.3}  # decode is memory-bound at batch 1


def _population(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`n` batches: size, pruned seconds and unpruned seconds with per-batch noise (shared by
    the batch's items: the cluster the bootstrap must respect)."""
    sizes = rng.choice([1, 2, 4, 8, 16], size=n, p=[0.1, 0.1, 0.2, 0.2, 0.4])
    pruned = sizes * 0.05 * rng.lognormal(0.0, 0.3, n)
    ratio = np.vectorize(TRUE_RATIO.get)(sizes)
    return sizes, pruned, pruned * ratio * rng.lognormal(0.0, 0.15, n)


def _estimate(sizes, pruned, unpruned, shadow: np.ndarray, seed: int, *, per_item: bool = False):
    seconds = {int(b): float(pruned[sizes == b].sum()) for b in np.unique(sizes)}
    s, p, u = sizes[shadow], pruned[shadow], unpruned[shadow]
    if per_item:  # the naive bootstrap: every item its own cluster with its share of the time
        s, p, u = (np.repeat(x / (1 if x is s else s), s) for x in (s, p, u))
    batches = ShadowBatches(p, u, size_bucket(s), np.full(len(p), "r", object))
    return stratified_unpruned(seconds, batches, n_boot=1000, seed=seed)


def test_the_estimate_recovers_a_ratio_that_depends_on_batch_size() -> None:
    rng = np.random.default_rng(0)
    sizes, pruned, unpruned = _population(rng, 4000)
    # small batches are over-sampled, as in a shadow pass that answered pairs in sub-batches
    weight = np.where(sizes <= 2, 5.0, 1.0)
    shadow = rng.choice(len(sizes), 400, replace=False, p=weight / weight.sum())
    est = _estimate(sizes, pruned, unpruned, shadow, seed=0)
    truth = unpruned.sum()
    assert est.estimate_s == pytest.approx(truth, rel=0.02)
    assert {b["bucket"]: b["ratio"] for b in est.buckets} == pytest.approx(TRUE_RATIO, rel=0.05)
    pooled = time_ratio(pruned[shadow], unpruned[shadow]) * pruned.sum()
    assert abs(pooled / truth - 1) > 0.05  # one pooled ratio would miss it


def test_interval_covers_the_truth_on_clustered_data() -> None:
    def covers(seed: int, per_item: bool) -> bool:
        rng = np.random.default_rng(seed)
        sizes, pruned, unpruned = _population(rng, 600)
        shadow = rng.choice(len(sizes), 60, replace=False)
        est = _estimate(sizes, pruned, unpruned, shadow, seed, per_item=per_item)
        lo, hi = percentile_ci(est.boots_s)
        return lo <= unpruned.sum() <= hi

    assert np.mean([covers(seed, False) for seed in range(200)]) >= 0.90
    # the contrast: items resampled apart (as if independent) give far too narrow intervals
    assert np.mean([covers(seed, True) for seed in range(50)]) < 0.75


def test_bootstrap_resamples_runs_when_nights_disagree() -> None:
    rng = np.random.default_rng(4)
    pruned = rng.uniform(0.5, 1.5, 80)
    unpruned = pruned * np.repeat([1.5, 2.5], 40) * rng.lognormal(0, 0.05, 80)  # two nights
    nights = np.repeat(np.array(["n1", "n2"], object), 40)
    ones = np.ones(80, np.int64)
    widths = []
    for runs in (np.full(80, "n", object), nights):
        est = stratified_unpruned({1: 1.0}, ShadowBatches(pruned, unpruned, ones, runs))
        lo, hi = percentile_ci(est.boots_s)
        widths.append(hi - lo)
    assert widths[1] > 3 * widths[0]  # the night-to-night spread is part of the uncertainty


def _flops_by_loop(shape: LlmShape, prompt: int, new: int) -> float:
    """Token by token: each processed token's matmuls and its attention over the cache."""
    h, ff, layers = shape.hidden_size, shape.intermediate_size, shape.num_layers
    kv = h * shape.num_kv_heads // shape.num_heads
    per_token_matmuls = layers * 2 * (h * h + h * kv + h * kv + h * h + 3 * h * ff)
    total = 0.0
    for position in range(1, prompt + new):  # the last generated token is never fed back
        total += per_token_matmuls + layers * (2 * position * h + 2 * position * h)
    return total + new * 2 * h * shape.vocab_size


def test_generation_flops_equal_a_token_by_token_count() -> None:
    got = generation_flops(SHAPE, np.array([100, 612, 5]), np.array([20, 20, 1]))
    want = [_flops_by_loop(SHAPE, p, n) for p, n in ((100, 20), (612, 20), (5, 1))]
    assert got == pytest.approx(want)


def test_flops_fall_back_to_parameters_and_unknown_shape_is_none() -> None:
    shape = LlmShape.from_dict({"parameters": 1000})
    assert generation_flops(shape, np.array([10]), np.array([1])) == pytest.approx([2000 * 10])
    assert generation_flops(LlmShape.from_dict({}), np.array([10]), np.array([1])) is None
    aliased = LlmShape.from_dict(
        {"num_hidden_layers": 3, "num_attention_heads": 4, "hidden_size": 8}
    )
    assert (aliased.num_layers, aliased.num_heads) == (3, 4)


def test_flops_scaling_touches_only_the_generate_share() -> None:
    stages = {"vision_s": 2.0, "select_s": 1.0, "generate_s": 7.0}
    scaled, _ = flops_scaled_seconds(100.0, stages, 3.0)
    assert scaled == pytest.approx(20 + 0 + 70 * 3)  # vision kept, selector gone, LLM x3
    assert flops_scaled_seconds(100.0, {}, 3.0)[0] == pytest.approx(300.0)


def test_answer_normalisation_and_token_f1() -> None:
    assert normalize_answer("  A  Cat!\nOn the MAT. ") == "a cat on the mat"
    assert token_f1("A cat.", "a cat") == 1.0
    # tokens {two, dogs, on, grass} vs {a, dog, on, the, grass}: 2 shared
    assert token_f1("two dogs on grass", "a dog on the grass") == pytest.approx(2 * 0.5 * 0.4 / 0.9)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0
    got = agreement(["A cat.", "two dogs on grass"], ["a cat", "a dog on the grass"])
    assert got["exact_match"] == 0.5 and got["n"] == 2
    assert got["token_f1"] == pytest.approx((1 + 2 * 0.5 * 0.4 / 0.9) / 2)
    assert agreement([], [])["exact_match"] is None


def test_run_stats_add_up() -> None:
    a = RunStats(items_ok=2, gpu_seconds=1.5, flops_pruned=1.0, flops_unpruned=2.0)
    b = RunStats(items_ok=3, items_error=1, gpu_seconds=2.5, flops_pruned=None)
    total = sum([a, b], RunStats())
    assert (total.items_ok, total.items_error, total.gpu_seconds) == (5, 1, 4.0)
    assert total.flops_pruned is None  # unknown stays unknown
    assert (a + a).flops_unpruned == 4.0


def test_ratio_interval_is_a_student_t_interval_that_widens_as_the_sample_shrinks() -> None:
    """Against scipy's t quantile and the ratio estimator's linearised standard error, by hand."""
    from scipy import stats

    assert max(abs(t975(d) - stats.t.ppf(0.975, d)) for d in range(1, 500)) < 5e-3
    p, u = np.array([1.0, 2.0, 4.0]), np.array([3.2, 5.8, 12.1])
    r = u.sum() / p.sum()
    se = np.sqrt(np.sum((u - r * p) ** 2) / (3 * 2)) / p.mean()
    lo, hi = ratio_interval(p, u)
    assert (lo, hi) == pytest.approx(
        (r - stats.t.ppf(0.975, 2) * se, r + stats.t.ppf(0.975, 2) * se), rel=1e-3
    )
    assert ratio_interval(p[:1], u[:1]) is None  # one batch: nothing known of the spread
    widths = []
    for n in (2, 4, 16, 256):
        sample = _sample(n, seed=n)
        a, b = ratio_interval(sample.pruned_s, sample.unpruned_s)
        widths.append(b - a)
    assert widths == sorted(widths, reverse=True)


@pytest.mark.parametrize("head_dim", [16, 32])  # 32: queries twice the hidden size (Gemma 3)
def test_flops_per_token_count_every_decoder_weight(head_dim: int) -> None:
    """Against the weights of a real decoder (Gemma 3's text model, whose query width is
    heads x head_dim, not its hidden size): 2 FLOPs per linear weight per token."""
    import torch
    from transformers import Gemma3TextConfig, Gemma3TextModel

    config = Gemma3TextConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        intermediate_size=128,
        num_hidden_layers=2,
        vocab_size=100,
    )
    weights = sum(
        m.weight.numel()
        for m in Gemma3TextModel(config).layers.modules()
        if isinstance(m, torch.nn.Linear)
    )
    shape = LlmShape.from_dict(
        {
            "hidden_size": 64,
            "num_layers": 2,
            "intermediate_size": 128,
            "num_heads": 4,
            "num_kv_heads": 2,
            "head_dim": head_dim,
        }
    )
    assert shape.linear_flops_per_token() == 2.0 * weights
    assert shape.attention_width() == 2 * 4 * head_dim
