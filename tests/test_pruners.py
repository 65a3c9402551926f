"""Each pruner's defining property, and text relevance, checked against independent references."""

import numpy as np
import pytest
import torch

from resprune.pruners import PRUNERS, TokenSet, build_pruner, resolve_keep, uniform_indices
from resprune.relevance import extract_content_words, token_relevance
from resprune.select import select_tokens


def _grid_set(rows=24, cols=24, d=96, seed=0, text=None) -> TokenSet:
    g = torch.Generator().manual_seed(seed)
    return TokenSet(torch.randn(rows * cols, d, generator=g), (rows, cols), text)


@pytest.mark.parametrize("method", PRUNERS)
def test_every_pruner_returns_sorted_unique_in_range(method):
    sets = [_grid_set(seed=1), _grid_set(10, 12, seed=2)]
    out = build_pruner(method).prune(sets, [64, 20])
    for s, k, p in zip(sets, [64, 20], out, strict=True):
        idx = p.indices.tolist()
        assert idx == sorted(set(idx)) and idx[0] >= 0 and idx[-1] < len(s.tokens)
        assert len(idx) == (len(s.tokens) if method == "none" else k) or method == "pool"
        assert 0.0 <= p.retained_energy <= 1.0 + 1e-5


def test_resprune_equals_selector_on_relevance_scaled_tokens():
    text = torch.randn(3, 96)
    s = _grid_set(seed=3, text=text)
    got = build_pruner("resprune", alpha=1.0).prune([s], [40])[0]
    v = torch.nn.functional.normalize(s.tokens, dim=-1)
    t = torch.nn.functional.normalize(text, dim=-1)
    rel = (v @ t.T).max(-1).values  # independent max-cos
    want = select_tokens(s.tokens, 40, relevance=rel, alpha=1.0)
    assert got.indices.tolist() == want.indices.tolist()
    assert torch.allclose(got.relevance, rel, atol=1e-6)


def test_resprune_alpha_zero_ignores_text():
    s_text = _grid_set(seed=4, text=torch.randn(2, 96))
    s_plain = _grid_set(seed=4)
    a = build_pruner("resprune", alpha=0.0).prune([s_text], [30])[0].indices
    b = build_pruner("resprune", alpha=1.0).prune([s_plain], [30])[0].indices
    assert a.tolist() == b.tolist()


def test_resprune_batches_mixed_sizes_and_budgets_like_single_calls():
    sets = [_grid_set(24, 24, seed=5), _grid_set(12, 20, seed=6), _grid_set(8, 8, seed=7)]
    pruner = build_pruner("resprune", alpha=1.0)
    batched = pruner.prune(sets, [32, 32, 10])
    for s, k, p in zip(sets, [32, 32, 10], batched, strict=True):
        assert p.indices.tolist() == pruner.prune([s], [k])[0].indices.tolist()


def test_resprune_one_call_for_all_budgets_equals_one_call_per_budget():
    """LLaVA-NeXT's crops: budgets differ per crop; truncated prefixes equal per-k calls."""
    text = torch.randn(3, 96, generator=torch.Generator().manual_seed(1))
    sets = [
        _grid_set(r, c, seed=20 + i, text=text)
        for i, (r, c) in enumerate([(24, 24), (24, 24), (12, 24), (24, 12), (6, 24)])
    ]
    ks = [70, 70, 35, 35, 9]
    got = build_pruner("resprune", alpha=1.0).prune(sets, ks)
    for k in set(ks):
        rows = [b for b, kk in enumerate(ks) if kk == k]
        n = max(len(sets[b].tokens) for b in rows)
        x, rel = torch.zeros(len(rows), n, 96), torch.ones(len(rows), n)
        mask = torch.zeros(len(rows), n, dtype=torch.bool)
        for j, b in enumerate(rows):
            m = len(sets[b].tokens)
            x[j, :m], rel[j, :m], mask[j, :m] = sets[b].tokens, got[b].relevance, True
        want = select_tokens(x, k, relevance=rel, alpha=1.0, mask=mask)
        for j, b in enumerate(rows):
            assert got[b].indices.tolist() == want.indices[j].tolist()
            assert got[b].retained_energy == pytest.approx(want.retained_energy[j].item(), abs=1e-6)


def test_random_is_seeded():
    s = _grid_set(seed=8)
    a = build_pruner("random", seed=1).prune([s], [50])[0].indices
    b = build_pruner("random", seed=1).prune([s], [50])[0].indices
    c = build_pruner("random", seed=2).prune([s], [50])[0].indices
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_uniform_spreads_evenly_over_the_grid():
    idx = uniform_indices(24, 24, 64)
    rows, cols = idx // 24, idx % 24
    blocks = torch.bincount((rows // 6) * 4 + cols // 6, minlength=16)
    assert len(idx) == 64 and blocks.tolist() == [4] * 16  # every 6x6 block gets k/16
    thin = uniform_indices(1, 100, 10)  # a 1-D sequence: stride 10
    assert torch.diff(thin).tolist() == [10] * 9


def test_pool_averages_windows():
    s = _grid_set(24, 24, seed=9)
    p = build_pruner("pool").prune([s], [64])[0]
    grid = s.tokens.reshape(24, 24, -1)
    want = torch.stack(
        [
            grid[r : r + 3, c : c + 3].reshape(9, -1).mean(0)
            for r in range(0, 24, 3)
            for c in range(0, 24, 3)
        ]
    )
    assert p.tokens.shape == (64, 96) and torch.allclose(p.tokens, want, atol=1e-5)
    assert p.indices.tolist() == [r * 24 + c for r in range(1, 24, 3) for c in range(1, 24, 3)]


def _divprune_reference(x: np.ndarray, k: int) -> list[int]:
    v = x / np.linalg.norm(x, axis=1, keepdims=True)
    dist = 1 - v @ v.T
    chosen = [int(np.argmax(dist.sum(1)))]
    while len(chosen) < k:
        score = [-1.0 if i in chosen else min(dist[i, j] for j in chosen) for i in range(len(x))]
        chosen.append(int(np.argmax(score)))
    return sorted(chosen)


def test_divprune_is_greedy_max_min_diversity():
    s = _grid_set(6, 6, d=8, seed=10)
    got = build_pruner("divprune").prune([s], [8])[0].indices.tolist()
    assert got == _divprune_reference(s.tokens.double().numpy(), 8)


def test_resolve_keep():
    assert resolve_keep(64, 576) == 64 and resolve_keep(1000, 576) == 576
    assert resolve_keep(0.25, 576) == 144 and resolve_keep(0.0001, 576) == 1
    for bad in (0, -3, 1.5, 0.0, True):
        with pytest.raises(ValueError, match="keep"):
            resolve_keep(bad, 10)


def test_unknown_pruner_is_named():
    with pytest.raises(ValueError, match="unknown pruning method 'fastv'"):
        build_pruner("fastv")


@pytest.mark.parametrize(
    ("question", "words"),
    [
        ("What color is the cat sitting on the sofa?", ["color", "cat", "sitting", "sofa"]),
        ("Describe this image in one sentence.", []),
        ("How many rockets are on the launch pad?", ["rockets", "launch", "pad"]),
        ("", []),
    ],
)
def test_content_words(question, words):
    got, extractor = extract_content_words(question)
    if extractor == "stopwords":
        assert got == words
    else:  # spaCy keeps nouns only: a subset of the stopword extractor's words
        assert set(got) <= set(words)


def test_token_relevance_is_max_cosine_and_falls_back_to_one():
    v = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])
    t = torch.tensor([[3.0, 0.0], [-1.0, -1.0]])
    assert token_relevance(v, t).tolist() == pytest.approx([1.0, 0.0, 0.5**0.5])
    assert token_relevance(v, None).tolist() == [1.0, 1.0, 1.0]
    assert token_relevance(v, torch.zeros(0, 2)).tolist() == [1.0, 1.0, 1.0]


def test_random_draws_per_image_by_key_and_nests_across_budgets():
    tokens = _grid_set(seed=8).tokens
    a, b = TokenSet(tokens, key="item-a#0"), TokenSet(tokens, key="item-b#0")
    pruner = build_pruner("random", seed=3)
    alone = pruner.prune([a], [50])[0].indices
    in_batch = pruner.prune([b, a, b], [50, 50, 30])
    assert torch.equal(in_batch[1].indices, alone)  # same id: same mask, whatever the batch
    assert not torch.equal(in_batch[0].indices, alone)  # another id: another mask
    assert set(in_batch[2].indices.tolist()) <= set(in_batch[0].indices.tolist())
    other_seed = build_pruner("random", seed=4).prune([a], [50])[0].indices
    assert not torch.equal(other_seed, alone)


@pytest.mark.parametrize("method", ["random", "uniform", "pool", "divprune"])
def test_baselines_read_the_device_once_per_call(method):
    """A baseline's call over many sets reads the device once (its energies, DivPrune's picks
    with them), as ResPrune's does: eval compares like with like. The tokens are marked as
    device tensors for the counter (tests/syncs.py)."""
    from tests.syncs import count_syncs

    sets = [_grid_set(6, 6, d=8, seed=20 + i) for i in range(5)]
    for i, s in enumerate(sets):
        s.key = f"item-{i}"
    pruner = build_pruner(method)
    alone = [pruner.prune([s], [7])[0] for s in sets]
    with count_syncs() as counter:
        for s in sets:
            counter.mark(s.tokens)
        batched = pruner.prune(sets, [7] * len(sets))
    assert counter.total == 1, counter.syncs
    for one, many in zip(alone, batched, strict=True):
        assert torch.equal(one.indices, many.indices)
        assert many.retained_energy == pytest.approx(one.retained_energy, abs=1e-6)
        assert many.indices.device.type == "cpu"


def test_divprune_batched_equals_the_reference_for_mixed_sizes():
    sets = [_grid_set(6, 6, d=8, seed=10), _grid_set(4, 5, d=8, seed=11), _grid_set(3, 3, d=8)]
    got = build_pruner("divprune").prune(sets, [8, 5, 9])
    for s, k, p in zip(sets, [8, 5, 9], got, strict=True):
        assert p.indices.tolist() == _divprune_reference(s.tokens.double().numpy(), k)


def test_divprune_prefix_energies_equal_one_qr_per_prefix():
    """The retained energy of every prefix (what the budget search cuts to) equals the share
    of the set's energy in the span of that prefix's tokens, computed by numpy per prefix."""
    s = _grid_set(6, 6, d=8, seed=12)
    pruner = build_pruner("divprune")
    full = pruner.prune([s], [12])[0]
    x = s.tokens.double().numpy()
    for k in (1, 5, 8, 12):
        basis, _ = np.linalg.qr(x[full.order[:k].numpy()].T)
        want = ((x @ basis) ** 2).sum() / (x**2).sum()
        cut = pruner.prefix(full, s, k)
        assert cut.retained_energy == pytest.approx(want, abs=1e-5)
        assert cut.indices.tolist() == pruner.prune([s], [k])[0].indices.tolist()
