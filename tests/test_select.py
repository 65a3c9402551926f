"""ResPrune's selector against independent float64 references (scipy pivoted QR, lstsq)."""

import itertools
from typing import ClassVar

import numpy as np
import pytest
import scipy.linalg
import torch

from resprune import select_tokens
from resprune.select import _bucket, _greedy_pivots, select_prefixes


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
        torch.tensor(x, dtype=torch.float32),
        10,
        relevance=torch.tensor(rel),
        alpha=alpha,
        relevance_floor=0.2,
    )
    y = x * np.sqrt(np.maximum(rel, 0.2) ** alpha)[:, None]  # g(r) = max(r, floor)^alpha
    _, _, piv = scipy.linalg.qr(y.T, pivoting=True, mode="economic")
    assert sel.indices.tolist() == sorted(piv[:10].tolist())


@pytest.mark.parametrize(
    ("alpha", "floor", "message"),
    [
        (1.0, 0.0, "relevance_floor must be in"),
        (1.0, 1.5, "relevance_floor must be in"),
        (-6.0, 1e-6, "float32 overflow"),
        (float("nan"), 0.1, "alpha must be finite"),
    ],
)
def test_bad_floor_or_alpha_is_refused(alpha, floor, message):
    with pytest.raises(ValueError, match=message):
        select_tokens(torch.randn(10, 4), 2, alpha=alpha, relevance_floor=floor)


# ---- rank exhaustion: picks after the rank is spent are deterministic and spread


def _exhausted_images(d=32) -> dict[str, tuple[torch.Tensor, int]]:
    """Token sets whose numerical rank is below k: (tokens [N, D], rank)."""
    gen = torch.Generator().manual_seed(11)
    blank = torch.randn(1, d, generator=gen).expand(144, d).clone()  # one token, repeated
    tile = torch.randn(4, d, generator=gen) * torch.tensor([1.0, 2.0, 3.0, 4.0])[:, None]
    tiled = tile[torch.arange(144) % 4]  # a 4-token patch tiled over the image
    low = torch.randn(144, 6, generator=gen) @ torch.randn(6, d, generator=gen)
    return {"blank": (blank, 1), "tiled": (tiled, 4), "low_rank": (low, 6)}


def _farthest_walk(n: int, picked: list[int], count: int) -> list[int]:
    """Reference rule: repeatedly take the free index farthest from every pick, lowest first."""
    picked = list(picked)
    for _ in range(count):
        free = [i for i in range(n) if i not in picked]
        gaps = [min((abs(i - p) for p in picked), default=n + 1) for i in free]
        picked.append(free[gaps.index(max(gaps))])
    return picked


@pytest.mark.parametrize("name", ["blank", "tiled", "low_rank"])
def test_rank_exhausted_picks_follow_qr_then_spread(name):
    x, rank = _exhausted_images()[name]
    _, _, piv = scipy.linalg.qr(x.double().numpy().T, pivoting=True, mode="economic")
    at_rank = select_tokens(x, rank).indices.tolist()
    assert at_rank == sorted(piv[:rank].tolist())  # pivoted QR while the rank lasts
    k = 24
    got = select_tokens(x, k).indices.tolist()
    want = _farthest_walk(x.shape[0], at_rank, k - rank)
    assert got == sorted(want)
    assert max(b - a for a, b in itertools.pairwise([0, *got, x.shape[0] - 1])) <= 2 * 144 // k
    assert select_tokens(x, k).retained_energy.item() == pytest.approx(1.0, abs=1e-5)


def test_rank_exhausted_picks_do_not_depend_on_batch_mates_or_padding():
    images = _exhausted_images()
    gen = torch.Generator().manual_seed(5)
    mates = [torch.randn(n, 32, generator=gen) * s for n, s in [(200, 5.0), (90, 0.01)]]
    sets = [mates[0], images["blank"][0], mates[1], images["tiled"][0], images["low_rank"][0]]
    rel = [torch.rand(len(s), generator=gen) for s in sets]
    n_max = max(len(s) for s in sets)
    x = torch.full((len(sets), n_max, 32), 7.0)  # loud padding
    r, mask = torch.rand(len(sets), n_max), torch.zeros(len(sets), n_max, dtype=torch.bool)
    for b, s in enumerate(sets):
        x[b, : len(s)], r[b, : len(s)], mask[b, : len(s)] = s, rel[b], True
    k = 40
    batched = select_tokens(x, k, relevance=r, mask=mask)
    for b, s in enumerate(sets):
        alone = select_tokens(s, k, relevance=rel[b])
        assert batched.indices[b].tolist() == alone.indices.tolist(), b


def test_zero_image_is_spread_without_nan():
    sel = select_tokens(torch.zeros(2, 50, 8), 5)
    assert sel.indices.tolist() == [sorted(_farthest_walk(50, [], 5))] * 2
    assert sel.retained_energy.tolist() == [1.0, 1.0]


# ---- prefix consistency and the CUDA bucket padding


def test_select_prefixes_equals_one_call_per_budget():
    gen = torch.Generator().manual_seed(9)
    lengths, ks = [60, 45, 60, 144, 52], [7, 19, 3, 30, 19]
    sets = [torch.randn(n, 24, generator=gen) for n in lengths[:3]]
    sets += [_exhausted_images(24)["tiled"][0], torch.randn(52, 24, generator=gen)]
    x = torch.zeros(len(sets), max(lengths), 24)
    mask = torch.zeros(len(sets), max(lengths), dtype=torch.bool)
    rel = torch.rand(len(sets), max(lengths), generator=gen)
    for b, s in enumerate(sets):
        x[b, : len(s)], mask[b, : len(s)] = s, True
    got = select_prefixes(x, ks, relevance=rel, mask=mask)
    for k in set(ks):
        rows = [b for b, kk in enumerate(ks) if kk == k]
        want = select_tokens(x[rows], k, relevance=rel[rows], mask=mask[rows])
        for j, b in enumerate(rows):
            assert got[b].indices.tolist() == want.indices[j].tolist()
            assert got[b].retained_energy.item() == pytest.approx(
                want.retained_energy[j].item(), abs=1e-6
            )
    with pytest.raises(ValueError, match="k must be"):
        select_prefixes(x, [7, 46, 3, 30, 19], mask=mask)  # 46 > 45 valid tokens


def _pad_to_bucket(gram, mask, spent_below, k):
    """The loop's inputs zero-padded to their bucket, as `_GraphCache.run` writes them into
    its static buffers (padding invalid), and the bucket's k."""
    b, n, _ = gram.shape
    bb, nb, kb = _bucket(b, n, k)
    pad = torch.nn.functional.pad
    rows = (0, nb - n, 0, bb - b)
    return (pad(gram, (0, nb - n, *rows)), pad(mask, rows), pad(spent_below, rows)), kb


def test_bucket_padding_keeps_the_picks():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 70, 16, generator=gen)
    x[1] = _exhausted_images(16)["tiled"][0][:70]
    mask = torch.arange(70)[None] < torch.tensor([70, 70, 41])[:, None]
    gram = torch.bmm(x, x.transpose(1, 2))
    spent = torch.full((3, 70), 1e-4)
    assert _bucket(3, 70, 20) == (4, 128, 32)
    padded, kb = _pad_to_bucket(gram, mask, spent, 20)
    assert [tuple(t.shape) for t in padded] == [(4, 128, 128), (4, 128), (4, 128)]
    order, coef = _greedy_pivots(gram, mask, spent, 20)
    order_b, coef_b = _greedy_pivots(*padded, kb)
    assert torch.equal(order_b[:3, :20], order)
    torch.testing.assert_close(coef_b[:3, :20, :70], coef)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_picks_equal_cpu_and_scipy(dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 300, 64))
    x[1] = _exhausted_images(64)["tiled"][0].repeat(3, 1)[:300].numpy()
    rel = rng.uniform(-0.3, 1.0, (4, 300))
    t = torch.tensor(x, dtype=torch.float32).to(dtype)
    mask = torch.ones(4, 300, dtype=torch.bool)
    mask[2, 250:] = False
    cpu = select_prefixes(t, [40, 40, 20, 64], relevance=torch.tensor(rel), mask=mask)
    for _ in range(2):  # the second call replays the captured graph
        gpu = select_prefixes(
            t.cuda(), [40, 40, 20, 64], relevance=torch.tensor(rel).cuda(), mask=mask.cuda()
        )
        assert [g.indices.tolist() for g in gpu] == [c.indices.tolist() for c in cpu]
    y = t[0].double().numpy()
    assert gpu[0].indices.tolist() == _reference_indices(y, 40, rel[0], 1.0)


# ---- the greedy step compiled, and the CUDA-graph plumbing emulated on the CPU


def _mixed_cases():
    """Batches with full-rank, rank-exhausted and padded images, budgets per row."""
    gen = torch.Generator().manual_seed(9)
    exhausted = _exhausted_images(24)
    cases = []
    for b, n, ks in [(5, 144, [40, 7, 19, 30, 24]), (3, 90, [16, 33, 5])]:
        sets = [torch.randn(n - 9 * i, 24, generator=gen) for i in range(b)]
        sets[0], sets[1] = exhausted["tiled"][0][:n], exhausted["blank"][0][: n - 9]
        x = torch.zeros(b, n, 24)
        mask = torch.zeros(b, n, dtype=torch.bool)
        for i, s in enumerate(sets):
            x[i, : len(s)], mask[i, : len(s)] = s, True
        cases.append((x, torch.rand(b, n, generator=gen) * 1.2 - 0.2, mask, ks))
    return cases


def test_compiled_step_keeps_the_picks(monkeypatch):
    """The step CUDA runs (`torch.compile`d, dynamic shapes), compiled here on the CPU: same
    picks as the eager step, one compiled graph for every shape."""
    from torch._dynamo.utils import counters

    import resprune.select as sel

    cases = _mixed_cases()
    eager = [select_prefixes(x, ks, relevance=r, mask=m) for x, r, m, ks in cases]
    graphs = counters["stats"]["unique_graphs"]
    sel.compiled_step.cache_clear()
    monkeypatch.setattr(sel, "_greedy_step", sel.compiled_step())
    for (x, r, m, ks), want in zip(cases, eager, strict=True):
        got = select_prefixes(x, ks, relevance=r, mask=m)
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g.order, w.order)
            torch.testing.assert_close(g.retained_by_prefix, w.retained_by_prefix)
    assert counters["stats"]["unique_graphs"] - graphs <= 1  # no recompile across shapes
    sel.compiled_step.cache_clear()


def test_greedy_step_op_count_matches_the_docstring():
    from torch.utils._python_dispatch import TorchDispatchMode

    import resprune.select as sel

    class Ops(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Ops.n += not func.is_view
            return func(*args, **(kwargs or {}))

    b, k, n = 2, 4, 10
    args = (torch.randn(b, n, n), torch.zeros(b, k, n), torch.rand(b, n))
    state = (torch.zeros(b, n, dtype=torch.bool), torch.full((b, n), 11.0), torch.zeros(b, n))
    with Ops():
        sel._greedy_step(*args, *state, torch.arange(n, dtype=torch.float32))
    assert Ops.n == sel.GREEDY_STEP_OPS
    assert f"{sel.GREEDY_STEP_OPS} " in sel.__doc__.replace("\n", " ")


class _FakeGraph:
    """A CUDA graph emulated on the CPU: capture records every op (a host sync during capture
    fails, as on CUDA); replay re-runs them into the recorded outputs."""

    pools: ClassVar[list] = []

    def capture_begin(self, pool=None):
        from torch.utils._python_dispatch import TorchDispatchMode

        _FakeGraph.pools.append(pool)
        ops = self.ops = []

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                assert name not in ("_local_scalar_dense", "item", "nonzero", "is_nonzero"), name
                out = func(*args, **(kwargs or {}))
                ops.append((func, args, kwargs or {}, out))
                return out

        self.mode = Record()
        self.mode.__enter__()

    def capture_end(self):
        self.mode.__exit__(None, None, None)

    def replay(self):
        for func, args, kwargs, out in self.ops:
            mutates = any(a.alias_info and a.alias_info.is_write for a in func._schema.arguments)
            if func.is_view:
                continue  # the recorded view still aliases its base
            result = func(*args, **kwargs)
            if not mutates:
                outs = [o if isinstance(o, tuple) else (o,) for o in (out, result)]
                for dst, src in zip(*outs, strict=True):
                    dst.copy_(src)


def test_cuda_graph_plumbing_emulated_on_cpu(monkeypatch):
    """`_GraphCache` as CUDA runs it, torch.cuda emulated: one memory pool for every capture,
    no `empty_cache`, shared static inputs, and replays (of any bucket, in any order) give the
    eager picks."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    import torch._dynamo  # imported before torch.cuda is emulated below

    import resprune.select as sel

    stream = SimpleNamespace(wait_stream=lambda other: None)
    fake = SimpleNamespace(
        graph_pool_handle=lambda: ("pool",),
        device=lambda d: nullcontext(),
        stream=lambda s: nullcontext(),
        Stream=lambda: stream,
        current_stream=lambda: stream,
        CUDAGraph=_FakeGraph,
        OutOfMemoryError=torch.cuda.OutOfMemoryError,
    )
    monkeypatch.setattr(torch, "cuda", fake)
    monkeypatch.setattr(sel, "COMPILE_STEP", False)
    _FakeGraph.pools = []
    cache = sel._GraphCache(torch.device("cpu"))
    calls = []
    for x, r, m, ks in _mixed_cases() * 2:
        w = sel.relevance_weights(r, 1.0)
        gram = torch.bmm(x, x.transpose(1, 2)) * (w.sqrt()[:, :, None] * w.sqrt()[:, None, :])
        spent = torch.full(m.shape, 1e-3) * w
        want = sel._greedy_pivots(gram, m, spent, max(ks))
        with torch.inference_mode():
            order, coef = cache.run(gram, m, spent, max(ks))
        b, n = m.shape
        assert torch.equal(order[:b, : max(ks)], want[0])
        torch.testing.assert_close(coef[:b, : max(ks), :n], want[1])
        calls.append(sel._bucket(b, n, max(ks)))
    assert len(cache.graphs) == 2 and list(cache.graphs) == calls[-2:]
    assert _FakeGraph.pools == [("pool",)] * 2  # two captures, one pool, then replays only
    assert cache.inputs.gram.numel() == max(b * n * n for b, n, _ in calls)


class _EagerCapture:
    """A bucket's "capture" on the CPU: remembers whether it ran inside an overhead window."""

    counted: ClassVar[list[bool]] = []

    def __init__(self, inputs, k, step, pool):
        from resprune import overhead

        self.inputs, self.k = inputs, k
        _EagerCapture.counted.append(overhead._depth > 0)

    def __call__(self):
        return _greedy_pivots(*self.inputs, self.k)


def test_graph_cache_one_time_work_is_counted_overhead():
    """Every capture and every growth of the static inputs runs inside
    `resprune.overhead.counted` (never inside timed selection); a later call of a captured
    bucket adds no overhead; the inputs grow at least twofold, so growths stay few."""
    import resprune.select as sel
    from resprune import overhead

    _EagerCapture.counted = []
    cache = sel._GraphCache(torch.device("cpu"), capture=_EagerCapture)
    gen = torch.Generator().manual_seed(3)
    sizes = [(2, 64), (1, 64), (2, 60), (1, 64), (4, 300), (1, 64), (1, 50)]
    spent_seen = []
    for b, n in sizes:
        x = torch.randn(b, n, 8, generator=gen)
        gram, mask = torch.bmm(x, x.transpose(1, 2)), torch.ones(b, n, dtype=torch.bool)
        before, numel = overhead.seconds(), cache.inputs.gram.numel()
        order, _ = cache.run(gram, mask, torch.full((b, n), 1e-3), 6)
        assert torch.equal(
            order[:b, :6], _greedy_pivots(gram, mask, torch.full((b, n), 1e-3), 6)[0]
        )
        spent_seen.append(overhead.seconds() > before)
        if cache.inputs.gram.numel() != numel and numel:
            assert cache.inputs.gram.numel() >= 2 * numel
    assert all(_EagerCapture.counted) and cache.captures == len(_EagerCapture.counted)
    # new buckets (and re-captures after a growth) paid overhead; repeats did not
    assert spent_seen == [True, True, False, False, True, True, False]
    assert any(label.startswith("select capture ") for label in overhead.by_label())


def test_graph_cap_holds_qwens_image_sizes():
    """Every Qwen2.5-VL image size (4 to 16,384 merged tokens, its processor's pixel range)
    at one batch and budget falls into at most _MAX_GRAPHS buckets: no eviction churn."""
    import resprune.select as sel

    buckets = {_bucket(8, n, 64) for n in range(4, 16385)}
    assert len(buckets) <= sel._MAX_GRAPHS


def test_buckets_above_128_and_for_large_n():
    assert [sel_b for sel_b, _, _ in map(lambda b: _bucket(b, 64, 16), (1, 3, 128, 129, 200))] == [
        1,
        4,
        128,
        192,
        256,
    ]
    assert [_bucket(1, n, 16)[1] for n in (1, 64, 576, 1000, 1025, 1280, 1300, 5000)] == [
        64,
        64,
        576,
        1024,
        1152,
        1280,
        1408,
        5120,
    ]
    for n in range(1, 20000, 37):
        assert n <= _bucket(1, n, 1)[1] <= max(n + 63, n * 9 // 8 + 1)
