"""The cost report's estimators against hand computations and independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.report.estimate import (
    LlmShape,
    agreement,
    bootstrap_ratios,
    flops_scaled_seconds,
    generation_flops,
    normalize_answer,
    percentile_ci,
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


def _sample(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pruned = rng.uniform(0.5, 1.5, n)
    return pruned, pruned * rng.normal(2.0, 0.3, n)


def test_bootstrap_ci_shrinks_as_the_shadow_sample_grows() -> None:
    widths = []
    for n in (10, 100, 1000):
        pruned, unpruned = _sample(n, seed=n)
        lo, hi = percentile_ci(bootstrap_ratios(pruned, unpruned, seed=0))
        assert lo <= time_ratio(pruned, unpruned) <= hi
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]


def test_bootstrap_ci_matches_the_delta_method_for_a_large_sample() -> None:
    pruned, unpruned = _sample(2000, seed=7)
    r = unpruned.sum() / pruned.sum()
    se = math.sqrt(np.sum((unpruned - r * pruned) ** 2)) / pruned.sum()  # linearised ratio SE
    lo, hi = percentile_ci(bootstrap_ratios(pruned, unpruned, seed=1))
    assert lo == pytest.approx(r - 1.96 * se, abs=0.25 * se)
    assert hi == pytest.approx(r + 1.96 * se, abs=0.25 * se)


def test_bootstrap_is_seeded_and_needs_two_items() -> None:
    pruned, unpruned = _sample(50, seed=3)
    a = bootstrap_ratios(pruned, unpruned, seed=5)
    assert np.array_equal(a, bootstrap_ratios(pruned, unpruned, seed=5))
    assert bootstrap_ratios(pruned[:1], unpruned[:1]) is None
    assert percentile_ci(None) is None


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
