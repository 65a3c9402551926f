"""ResPrune's selector against independent float64 references (scipy pivoted QR, lstsq)."""

import itertools

import numpy as np
import pytest
import scipy.linalg
import torch

from resprune import select_tokens


def _weights(rel: np.ndarray | None, alpha: float) -> np.ndarray:
    if rel is None or alpha == 0:
        return np.ones(1)
    return np.maximum(rel, 1e-6) ** alpha  # the default relevance floor


def _reference_indices(x: np.ndarray, k: int, rel=None, alpha=1.0) -> list[int]:
    y = x * np.sqrt(_weights(rel, alpha))[:, None]
    _, _, piv = scipy.linalg.qr(y.T.astype(np.float64), pivoting=True, mode="economic")
    return sorted(piv[:k].tolist())


def _reference_energy(x: np.ndarray, idx) -> float:
    x = x.astype(np.float64)
    basis = x[list(idx)].T  # [D, k]
    coef, *_ = np.linalg.lstsq(basis, x.T, rcond=None)
    resid = x.T - basis @ coef
    return 1 - (resid**2).sum() / (x**2).sum()


def _inputs(kind: str, rng: np.random.Generator, n=80, d=24) -> np.ndarray:
    if kind == "random":
        return rng.standard_normal((n, d))
    if kind == "low_rank":
        return rng.standard_normal((n, 6)) @ rng.standard_normal((6, d))
    base = rng.standard_normal((n // 2, d))  # near-duplicates: every token twice, tiny noise
    return np.concatenate([base, base + 1e-3 * rng.standard_normal(base.shape)])


@pytest.mark.parametrize("kind", ["random", "low_rank", "near_duplicate"])
@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.5])
def test_matches_scipy_pivoted_qr(kind, alpha):
    rng = np.random.default_rng(7)
    x = _inputs(kind, rng)
    rel = rng.uniform(-0.3, 1.0, len(x))
    k = 5 if kind == "low_rank" else 12
    sel = select_tokens(
        torch.tensor(x, dtype=torch.float32), k, relevance=torch.tensor(rel), alpha=alpha
    )
    assert sel.indices.tolist() == _reference_indices(x, k, rel, alpha)
    assert sel.retained_energy.item() == pytest.approx(_reference_energy(x, sel.indices), abs=1e-4)


def test_near_duplicates_are_not_both_kept():
    rng = np.random.default_rng(1)
    x = _inputs("near_duplicate", rng, n=40)
    idx = set(select_tokens(torch.tensor(x, dtype=torch.float32), 10).indices.tolist())
    assert not any(i in idx and i + 20 in idx for i in range(20))


def test_batched_masked_equals_single_calls():
    torch.manual_seed(0)
    lengths = [50, 37, 44]
    x = torch.randn(3, 50, 16)
    rel = torch.rand(3, 50)
    mask = torch.arange(50)[None] < torch.tensor(lengths)[:, None]
    x_padded = torch.where(mask[..., None], x, torch.full_like(x, 100.0))  # loud padding
    batched = select_tokens(x_padded, 9, relevance=rel, alpha=1.0, mask=mask)
    for b, n in enumerate(lengths):
        single = select_tokens(x[b, :n], 9, relevance=rel[b, :n], alpha=1.0)
        assert batched.indices[b].tolist() == single.indices.tolist()
        assert batched.retained_energy[b].item() == pytest.approx(
            single.retained_energy.item(), abs=1e-5
        )
        assert batched.indices[b].max().item() < n  # padding is never selected


def test_bfloat16_input_is_computed_in_float32():
    torch.manual_seed(1)
    x = torch.randn(2, 60, 32).to(torch.bfloat16)
    got = select_tokens(x, 8)
    want = select_tokens(x.float(), 8)
    assert got.retained_energy.dtype == torch.float32
    assert torch.equal(got.indices, want.indices)


def test_energy_is_monotone_in_k_and_full_at_n():
    torch.manual_seed(2)
    x = torch.randn(30, 40)
    energies = [select_tokens(x, k).retained_energy.item() for k in range(1, 31)]
    assert all(b >= a - 1e-6 for a, b in itertools.pairwise(energies))
    assert energies[-1] == pytest.approx(1.0, abs=1e-5)
    assert select_tokens(x, 30).indices.tolist() == list(range(30))


def test_rank_exhausted_keeps_energy_at_one():
    torch.manual_seed(3)
    x = torch.randn(100, 8)  # more tokens than dimensions
    sel = select_tokens(x, 20)
    assert sel.retained_energy.item() == pytest.approx(1.0, abs=1e-5)
    assert len(set(sel.indices.tolist())) == 20


def test_ties_break_to_lowest_index():
    x = torch.zeros(6, 4)
    x[[1, 3, 5], 0] = 1.0  # three identical tokens, then nothing else carries energy
    assert select_tokens(x, 1).indices.tolist() == [1]


def test_relevance_steers_selection():
    x = torch.eye(4) * torch.tensor([1.0, 1.1, 1.2, 1.3])[:, None]
    rel = torch.tensor([1.0, 0.1, 0.1, 0.1])
    assert select_tokens(x, 1).indices.tolist() == [3]
    assert select_tokens(x, 1, relevance=rel, alpha=1.0).indices.tolist() == [0]
    assert select_tokens(x, 1, relevance=rel, alpha=0.0).indices.tolist() == [3]
    assert select_tokens(x, 1, relevance=rel, alpha=-1.0).indices.tolist() == [3]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "k must be"),
        ({"k": 11}, "k must be"),
        ({"k": 2.5}, "k must be"),
        ({"k": 2, "relevance": torch.ones(9)}, "relevance must have shape"),
        ({"k": 2, "mask": torch.ones(1, 9, dtype=torch.bool)}, "mask must have shape"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        select_tokens(torch.randn(10, 4), **kwargs)


def test_non_finite_tokens_are_rejected():
    x = torch.randn(10, 4)
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="tokens contains NaN"):
        select_tokens(x, 2)
    with pytest.raises(ValueError, match="tokens must be"):
        select_tokens(torch.randn(2, 3, 4, 5), 1)


@pytest.mark.parametrize("alpha", [1.0, 2.0, -1.0])
def test_relevance_below_the_floor_counts_as_the_floor(alpha):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((60, 16))
    rel = rng.uniform(-0.5, 1.0, 60)
    sel = select_tokens(
        torch.tensor(x, dtype=torch.float32), 10, relevance=torch.tensor(rel), alpha=alpha,
        relevance_floor=0.2,
    )  # fmt: skip
    y = x * np.sqrt(np.maximum(rel, 0.2) ** alpha)[:, None]  # g(r) = max(r, floor)^alpha
    _, _, piv = scipy.linalg.qr(y.T, pivoting=True, mode="economic")
    assert sel.indices.tolist() == sorted(piv[:10].tolist())


@pytest.mark.parametrize(
    ("alpha", "floor", "message"),
    [(1.0, 0.0, "relevance_floor must be in"), (1.0, 1.5, "relevance_floor must be in"),
     (-6.0, 1e-6, "float32 overflow"), (float("nan"), 0.1, "alpha must be finite")],
)  # fmt: skip
def test_bad_floor_or_alpha_is_refused(alpha, floor, message):
    with pytest.raises(ValueError, match=message):
        select_tokens(torch.randn(10, 4), 2, alpha=alpha, relevance_floor=floor)
