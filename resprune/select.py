"""ResPrune's token selector: greedy subspace expansion by text-modulated residual energy.

With S the kept set and P_S the projector onto span{v_j : j in S}, each step adds the token
with the largest ``g(r_i) * ||v_i - P_S v_i||^2`` where ``g(r) = max(r, floor) ** alpha``.
Scaling each token by ``sqrt(g(r_i))`` turns this into greedy column-pivoted QR, computed here
as pivoted Cholesky of the weighted Gram matrix in float32: after picking the unit residual
q, every token's energy drops by ``<q, y>^2``. One batched GEMM builds the Gram matrix (bf16
inputs on CUDA multiply exactly with float32 accumulation), the relevance weights scale its
rows and columns, and each of the k steps then costs O(B N k), batched over images.

Rank exhaustion. When k exceeds the numerical rank of an image's tokens (a blank image,
repeated patches), the residual energies left are round-off, and picking by them would be
decided by noise: by the batch-mates' padding and the GEMM's tiling. A token is *spent* when
its unweighted residual energy is at most ``SPENT_TOL * ||x_i|| * max_j ||x_j||`` over the
image's own valid tokens: the scale of the round-off its projections carry (measured at up to
1e-4 after the rank is spent, for ranks 4 to 500 at D = 4096), so the threshold never depends
on the batch or on the relevance weights. Spent tokens are never picked by energy. Once every
remaining token of an image is spent, each further pick is the free valid token farthest (in
token index) from every token picked so far, ties to the lowest index: deterministic,
independent of the batch and spread over the image. While the rank lasts, the picks are those
of pivoted QR.

Prefix consistency. Every step depends only on the steps before it, never on k, so the first
k' picks of a run to k are the picks of a run to k'. `select_prefixes` uses that to serve
rows with different budgets (LLaVA-NeXT's crops) from one call at the largest k.

One greedy step is 26 aten ops when eager (`_greedy_step`, counted by a test; plus two
writes of the pick and its column), on fixed shapes whatever the step. On CUDA the step is
`torch.compile`d once (dynamic shapes; on the CPU inductor fuses all of it into one kernel,
bmm included), and the k-step loop is captured once per shape bucket in a CUDA graph and
replayed: batch to a power of two up to 128, then a multiple of 64; tokens to a multiple of 64
up to 1024, then eight steps per power of two, at most 12.5 % over (Qwen's N varies per
image); k to a multiple of 16 (picks of a padded call equal the unpadded ones: padding is
masked, and a longer run's prefix is the shorter run). All buckets share one memory pool and
one set of static input buffers, and capturing does not empty the allocator's cache. The loop
never synchronises with the host. On the CPU the same loop runs eagerly.

One-time work is billed overhead, never selection time: the step's compile, each bucket's
capture, and growing the static inputs (which drops every graph captured on them) all run
inside `resprune.overhead.counted`, so a re-capture is never inside timed work. The inputs grow
to at least twice their size (few growths over a job), and up to _MAX_GRAPHS buckets stay
captured (least recently used dropped: enough for Qwen's image sizes at a few batch sizes).

This module knows nothing about models, questions or text: relevance arrives as numbers.
"""

from __future__ import annotations

import functools
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from resprune import overhead
from resprune.floor import RELEVANCE_FLOOR, check_relevance_floor
from resprune.host import to_device, to_host

SPENT_TOL = 1e-3  # residual energy share at float32 round-off (see the docstring)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_TOKEN_BUCKET, _K_BUCKET, _MAX_GRAPHS = 64, 16, 64
GREEDY_STEP_OPS = 26  # aten ops (views excluded) of one eager `_greedy_step`
COMPILE_STEP = True  # on CUDA, the greedy step is `torch.compile`d (eager if that fails)


@dataclass(frozen=True)
class Selection:
    """Kept token indices (ascending) and the share of token energy their span retains.

    `select_prefixes` also gives the pick ``order`` and ``retained_by_prefix`` (entry j: the
    share retained by the first j + 1 picks), so a caller can take any shorter prefix.
    """

    indices: torch.Tensor  # long [k] or [B, k]
    retained_energy: torch.Tensor  # float32 [] or [B]
    order: torch.Tensor | None = None  # long [k]: the picks in the order they were made
    retained_by_prefix: torch.Tensor | None = None  # float32 [k]


def relevance_weights(
    relevance: torch.Tensor, alpha: float, floor: float = RELEVANCE_FLOOR
) -> torch.Tensor:
    """``g(r) = max(r, floor) ** alpha``: r ** alpha above the floor; alpha = 0 gives all ones."""
    if alpha == 0:
        return torch.ones_like(relevance, dtype=torch.float32)
    return relevance.float().clamp_min(floor).pow(alpha)


def select_tokens(
    tokens: torch.Tensor,
    k: int,
    *,
    relevance: torch.Tensor | None = None,
    alpha: float = 1.0,
    mask: torch.Tensor | None = None,
    relevance_floor: float = RELEVANCE_FLOOR,
) -> Selection:
    """Select ``k`` tokens per image by greedy residual-energy subspace expansion.

    Args:
        tokens: float [N, D] or [B, N, D], any float dtype (computed in float32).
        k: tokens to keep per image, 1 <= k <= valid tokens of every image.
        relevance: None (r = 1) or [N] / [B, N] text relevance r_i.
        alpha: exponent of the relevance modulation; 0 ignores relevance.
        mask: None or bool [B, N] (or [N]), True for valid tokens; padding is never kept.
        relevance_floor: relevance below it counts as the floor, ``g(r) = max(r, floor) ** alpha``.

    The arguments' values (finite, enough valid tokens) are checked with one host read after
    the run, the call's only synchronisation with the device.
    """
    check_relevance_floor(alpha, relevance_floor)
    x, r, m, r_ok = _validate(tokens, relevance, mask)
    _check_budget_types([k] * x.shape[0], x.shape)
    order, curve, x_ok = _select(x, r, (alpha, relevance_floor), m, k)
    _check_values(to_host(_checks(m, r_ok, x_ok))[0], [k] * x.shape[0])
    indices, retained = order.sort(dim=-1).values, curve[:, -1]
    if tokens.dim() == 2:
        return Selection(indices[0], retained[0])
    return Selection(indices, retained)


def select_prefixes(
    tokens: torch.Tensor,
    ks: Sequence[int],
    *,
    relevance: torch.Tensor | None = None,
    alpha: float = 1.0,
    mask: torch.Tensor | None = None,
    relevance_floor: float = RELEVANCE_FLOOR,
    host: bool = False,
) -> list[Selection]:
    """`select_tokens` with a budget per image: one run to ``max(ks)``, row b keeps ``ks[b]``.

    Equal to one `select_tokens` call per distinct budget (greedy picks are prefix-consistent).
    Arguments as for `select_tokens` with tokens [B, N, D]; returns one Selection per image.
    ``host``: the Selections' tensors on the host, read with the checks in one device read.
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
        raise ValueError("tokens must be a [B, N, D] tensor")
    check_relevance_floor(alpha, relevance_floor)
    x, r, m, r_ok = _validate(tokens, relevance, mask)
    _check_budget_types(ks, x.shape)
    order, curve, x_ok = _select(x, r, (alpha, relevance_floor), m, max(ks))
    if host:
        checks, order_h, curve_h = to_host(_checks(m, r_ok, x_ok), order, curve)
        _check_values(checks, ks)
        return [_host_selection(order_h[b], curve_h[b], k) for b, k in enumerate(ks)]
    _check_values(to_host(_checks(m, r_ok, x_ok))[0], ks)
    budgets = to_device(np.asarray(ks, dtype=np.int64), order.device)
    beyond = torch.arange(order.shape[1], device=order.device) >= budgets[:, None]
    kept = order.masked_fill(beyond, x.shape[1]).sort(dim=-1).values  # kept first, ascending
    retained = curve.gather(1, (budgets - 1)[:, None])[:, 0]
    return [
        Selection(kept[b, :k], retained[b], order[b, :k], curve[b, :k]) for b, k in enumerate(ks)
    ]


def _host_selection(order: np.ndarray, curve: np.ndarray, k: int) -> Selection:
    """One row's Selection from its host pick order and retained curve."""
    order_k = torch.from_numpy(np.ascontiguousarray(order[:k]))
    curve_k = torch.from_numpy(np.ascontiguousarray(curve[:k]))
    return Selection(torch.from_numpy(np.sort(order[:k])), curve_k[-1], order_k, curve_k)


def _select(
    x: torch.Tensor,
    r: torch.Tensor | None,
    g: tuple[float, float],
    mask: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pick order [B, k], the energy share retained by each prefix of it [B, k], and whether
    every valid token is finite (a bool on the device, read by the caller with the rest).

    ``g`` = (alpha, relevance floor) of the relevance weights.
    """
    alpha, floor = g
    w = None if r is None or alpha == 0 else relevance_weights(r, alpha, floor)
    gram = _gram(x)
    energy_x = torch.diagonal(gram, dim1=1, dim2=2).clone()  # the Gram is weighted in place
    finite = torch.isfinite(energy_x).logical_or(~mask).all()  # ||x_i||^2 of a NaN/inf token
    norm = energy_x.clamp_min(0.0).sqrt()
    spent_below = SPENT_TOL * norm * norm.masked_fill(~mask, 0.0).amax(-1, keepdim=True)
    if w is not None:
        gram.mul_(w.sqrt()[:, :, None] * w.sqrt()[:, None, :])
        spent_below = spent_below * w
    order, coef = _run_greedy(gram, mask, spent_below, k)
    return order, _retained_curve(energy_x, mask, coef, w), finite


def _validate(
    tokens: torch.Tensor, relevance: torch.Tensor | None, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Tokens [B, N, D], relevance, mask on the tokens' device; the shapes checked here, and
    whether the relevance is finite as a device bool (read later with the other checks)."""
    if not isinstance(tokens, torch.Tensor) or not tokens.is_floating_point():
        raise ValueError(f"tokens must be a float tensor, got {type(tokens).__name__}")
    if tokens.dim() not in (2, 3):
        raise ValueError(f"tokens must be [N, D] or [B, N, D], got shape {tuple(tokens.shape)}")
    x = tokens if tokens.dim() == 3 else tokens.unsqueeze(0)
    b, n, _ = x.shape
    m = _batched(mask, "mask", (b, n), tokens.dim())
    m = torch.ones(b, n, dtype=torch.bool, device=x.device) if m is None else m.bool()
    m = m.to(x.device)
    r = _batched(relevance, "relevance", (b, n), tokens.dim())
    if r is None:
        return x, None, m, None
    r = r.to(x.device)
    return x, r, m, torch.isfinite(r.float()).logical_or(~m).all()


def _check_budget_types(ks: Sequence[int], shape: torch.Size) -> None:
    """What the host knows: one int budget per image, each in [1, N]."""
    if len(ks) != shape[0]:
        raise ValueError(f"got {len(ks)} budgets for {shape[0]} images")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= shape[1]:
            raise ValueError(
                f"k must be an int in [1, {shape[1]}] (valid tokens per image), got {k!r}"
            )


def _checks(mask: torch.Tensor, r_ok: torch.Tensor | None, x_ok: torch.Tensor) -> torch.Tensor:
    """Valid tokens per image, then relevance finite, then tokens finite: long [B + 2]."""
    r_ok = torch.ones((), dtype=torch.bool, device=mask.device) if r_ok is None else r_ok
    return torch.cat([mask.sum(-1), torch.stack([r_ok, x_ok]).long()])


def _check_values(checks: np.ndarray, ks: Sequence[int]) -> None:
    """The checks `_checks` read back: relevance finite, budgets within the valid tokens,
    tokens finite (in that order)."""
    valid, r_ok, x_ok = checks[:-2], checks[-2], checks[-1]
    if not r_ok:
        raise ValueError("relevance contains NaN or inf")
    for k, n in zip(ks, valid.tolist(), strict=True):
        if not k <= n:
            raise ValueError(f"k must be an int in [1, {n}] (valid tokens per image), got {k!r}")
    if not x_ok:
        raise ValueError("tokens contains NaN or inf among the valid tokens (or overflows float32)")


def _batched(
    value: torch.Tensor | None, name: str, shape: tuple[int, int], token_dims: int
) -> torch.Tensor | None:
    if value is None:
        return None
    v = value.unsqueeze(0) if (token_dims == 2 and value.dim() == 1) else value
    if tuple(v.shape) != shape:
        want = shape[1:] if token_dims == 2 else shape
        raise ValueError(f"{name} must have shape {want}, got {tuple(value.shape)}")
    return v


def _gram(x: torch.Tensor) -> torch.Tensor:
    """``x x^T`` in float32; half-precision inputs on CUDA multiply exactly, accumulate in fp32."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        return torch.bmm(x, x.transpose(1, 2), out_dtype=torch.float32)
    x = x.float()
    return torch.bmm(x, x.transpose(1, 2))


def _greedy_pivots(
    gram: torch.Tensor,
    mask: torch.Tensor,
    spent_below: torch.Tensor,
    k: int,
    step: Callable[..., tuple[torch.Tensor, ...]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy pivoted Cholesky of ``gram`` [B, N, N] with the rank-exhaustion rule.

    A token whose residual energy is at most ``spent_below`` [B, N] is spent (round-off).
    Returns the pick order [B, k] and ``c[b, s, i] = <q_s, y_i>`` [B, k, N], the coefficients
    of every token on the orthonormal basis (zero rows for picks made after exhaustion).
    Each pick is one call of ``step`` (default `_greedy_step`, eager; CUDA passes the compiled
    one) on fixed shapes, so one compiled step serves all k steps. Pure tensor code with no
    host synchronisation, so a CUDA graph can capture it.
    """
    b, n, _ = gram.shape
    step = step or _greedy_step
    blocked = ~mask  # padding, then every picked token
    energy = torch.diagonal(gram, dim1=1, dim2=2).masked_fill(blocked, -1.0)
    position = torch.arange(n, device=gram.device, dtype=torch.float32)
    gap = torch.full((b, n), float(n + 1), device=gram.device)  # index distance to the picks
    chosen = torch.zeros(b, k, dtype=torch.long, device=gram.device)
    coef = torch.zeros(b, k, n, dtype=gram.dtype, device=gram.device)
    for s in range(k):
        pick, col, energy, blocked, gap = step(
            gram, coef, energy, blocked, gap, spent_below, position
        )
        chosen[:, s] = pick[:, 0]
        coef[:, s] = col
    return chosen, coef


def _greedy_step(
    gram: torch.Tensor,
    coef: torch.Tensor,
    energy: torch.Tensor,
    blocked: torch.Tensor,
    gap: torch.Tensor,
    spent_below: torch.Tensor,
    position: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """One greedy pick for every image: (pick [B, 1], its column [B, N], then the updated
    energy, blocked and gap). ``coef`` [B, k, N] holds the columns picked so far and zero
    rows after them, so every step has the same shapes (the zero rows add exact zeros).
    GREEDY_STEP_OPS aten ops when eager; `torch.compile` fuses them."""
    b, k, n = coef.shape
    live = energy > spent_below
    has_live = live.any(-1, keepdim=True)
    by_energy = energy.masked_fill(~live, -1.0)
    score = torch.where(has_live, by_energy, gap.masked_fill(blocked, -1.0))
    pick = score.argmax(dim=-1, keepdim=True)  # first maximum: ties to the lowest index
    resid = energy.gather(1, pick).clamp_min(1e-30)
    picked = coef.gather(2, pick[:, None, :].expand(b, k, 1))  # [B, k, 1]
    row = gram.gather(1, pick[:, :, None].expand(b, 1, n))[:, 0]
    col = row - torch.bmm(picked.transpose(1, 2), coef)[:, 0]
    col = torch.where(has_live, col / resid.sqrt(), 0.0)
    blocked = blocked.scatter(1, pick, True)
    gap = torch.minimum(gap, (position - pick).abs())
    energy = (energy - col * col).clamp_min(0.0).masked_fill(blocked, -1.0)
    return pick, col, energy, blocked, gap


@functools.cache
def compiled_step() -> Callable[..., tuple[torch.Tensor, ...]]:
    """`_greedy_step` compiled once for every shape (dynamic shapes, one graph, no breaks)."""
    return torch.compile(_greedy_step, dynamic=True, fullgraph=True)


def _bucket(b: int, n: int, k: int) -> tuple[int, int, int]:
    """Padded (batch, tokens, k) of the CUDA-graph bucket holding a call of this shape.

    Batch: powers of two to 128, then multiples of 64. Tokens: multiples of 64 to 1024 (LLaVA's
    576 exactly), then eight steps per power of two (Qwen's N varies with the image: at most
    12.5 % over, so a few dozen buckets cover 64..16k tokens). k: multiples of 16.
    """
    bb = next((c for c in _BATCH_BUCKETS if c >= b), -(-b // 64) * 64)
    step = max(_TOKEN_BUCKET, 1 << max(0, (n - 1).bit_length() - 4))
    return bb, -(-n // step) * step, -(-k // _K_BUCKET) * _K_BUCKET


class _StaticInputs:
    """One set of input buffers per device, shared by every captured bucket (graphs replay one
    at a time): each bucket's inputs are views at offset 0, so memory is the largest bucket's,
    not the sum. Growing them re-allocates, which makes every graph captured on them stale."""

    def __init__(self, device: torch.device):
        self.device = device
        self.gram = self.mask = self.spent = torch.zeros(0, device=device)

    def fits(self, b: int, n: int) -> bool:
        return b * n * n <= self.gram.numel() and b * n <= self.mask.numel()

    def grow(self, b: int, n: int) -> None:
        """Buffers for at least (b, n) and at least twice the old ones; the caller drops its
        graphs (and their views) first."""
        big = max(b * n * n, 2 * self.gram.numel())
        small = max(b * n, 2 * self.mask.numel())
        self.gram = self.mask = self.spent = None  # free the old ones before allocating
        self.gram = torch.zeros(big, device=self.device)
        self.mask = torch.zeros(small, dtype=torch.bool, device=self.device)
        self.spent = torch.zeros(small, device=self.device)

    def views(self, b: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (
            self.gram[: b * n * n].view(b, n, n),
            self.mask[: b * n].view(b, n),
            self.spent[: b * n].view(b, n),
        )


class _CapturedGreedy:
    """`_greedy_pivots` for one bucket, captured in a CUDA graph on the shared static inputs and
    in the shared memory pool; a call replays it and clones the outputs out of the pool."""

    def __init__(self, inputs: tuple[torch.Tensor, ...], k: int, step, pool) -> None:
        cuda = torch.cuda
        with cuda.device(inputs[0].device):  # capture on the tensors' device
            side = cuda.Stream()
            side.wait_stream(cuda.current_stream())
            with cuda.stream(side):
                _greedy_pivots(*inputs, k, step)  # warm-up (and compile) off the capture
                self.graph = cuda.CUDAGraph()
                # capture_begin itself: torch.cuda.graph() would synchronise and empty the
                # allocator's cache before every capture
                self.graph.capture_begin(pool=pool)
                try:
                    self.outputs = _greedy_pivots(*inputs, k, step)
                finally:
                    self.graph.capture_end()
            cuda.current_stream().wait_stream(side)

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.graph.replay()
        return self.outputs[0].clone(), self.outputs[1].clone()


class _GraphCache:
    """Captured buckets of one device, least recently used dropped beyond _MAX_GRAPHS, all in
    one memory pool (`torch.cuda.graph_pool_handle`) and on one set of static inputs.

    ``capture`` makes a bucket's replayable run (`_CapturedGreedy` on CUDA; the tests pass an
    eager stand-in to check the bookkeeping on the CPU)."""

    def __init__(self, device: torch.device, capture: Callable[..., Callable] | None = None):
        self.device = device
        self.inputs = _StaticInputs(device)
        self.pool = None if capture else torch.cuda.graph_pool_handle()
        self.graphs: OrderedDict[tuple[int, int, int], Callable] = OrderedDict()
        self.capture = capture or _CapturedGreedy
        self.step = compiled_step() if COMPILE_STEP else _greedy_step
        self.captures = 0  # buckets captured (re-captures included), all counted as overhead

    def run(self, gram, mask, spent_below, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        bucket = _bucket(*gram.shape[:2], k)
        if bucket not in self.graphs:  # every graph kept was captured on inputs it fits
            self._prepare(bucket)
        views = self.inputs.views(*bucket[:2])
        for static, value in zip(views, (gram, mask, spent_below), strict=True):
            static.zero_()  # the padding: invalid tokens, zero Gram entries
            static[tuple(slice(0, d) for d in value.shape)].copy_(value)
        self.graphs.move_to_end(bucket)
        return self.graphs[bucket]()

    def _prepare(self, bucket: tuple[int, int, int]) -> None:
        """Grow the static inputs if the bucket needs it (dropping the graphs captured on the
        old ones), then capture the bucket: all one-time work, counted as overhead."""
        label = "select capture {}x{}x{}".format(*bucket)
        with overhead.counted(label, self.device):
            if not self.inputs.fits(*bucket[:2]):
                self.graphs.clear()  # captured on the buffers about to go
                self.inputs.grow(*bucket[:2])
            while len(self.graphs) >= _MAX_GRAPHS:
                self.graphs.popitem(last=False)
            self.graphs[bucket] = self._capture(self.inputs.views(*bucket[:2]), bucket[2])
            self.captures += 1

    def _capture(self, views, k: int) -> Callable:
        """Capture with the compiled step; with the eager one where compiling fails (once)."""
        try:
            return self.capture(views, k, self.step, self.pool)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # no Triton, an inductor bug: eager is slower, not wrong
            if self.step is _greedy_step:
                raise
            warnings.warn(f"selector step runs eager: compiling failed: {exc!r}", stacklevel=2)
            self.step = _greedy_step
            return self.capture(views, k, self.step, self.pool)


_GRAPHS: dict[torch.device, _GraphCache] = {}


def _run_greedy(
    gram: torch.Tensor, mask: torch.Tensor, spent_below: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The greedy loop: eager on the CPU, a replayed CUDA graph per shape bucket on CUDA."""
    if not gram.is_cuda:
        return _greedy_pivots(gram, mask, spent_below, k)
    b, n, _ = gram.shape
    with torch.inference_mode():  # static buffers stay inference tensors in every later call
        if gram.device not in _GRAPHS:
            _GRAPHS[gram.device] = _GraphCache(gram.device)
        chosen, coef = _GRAPHS[gram.device].run(gram, mask, spent_below, k)
    return chosen[:b, :k], coef[:b, :k, :n]


def _retained_curve(
    energy_x: torch.Tensor,
    mask: torch.Tensor,
    coef: torch.Tensor,
    weights: torch.Tensor | None,
) -> torch.Tensor:
    """``sum_i E_S(x_i) / sum_i ||x_i||^2`` over valid tokens, per prefix S [B, k].

    Entry [b, j] takes S = row b's first j + 1 picks. The span of the kept scaled tokens
    equals the span of the kept tokens, so the energy of x_i inside it is the captured
    energy of y_i divided by its weight; each pick adds its basis vector's share.
    """
    captured = coef.pow(2)  # [B, k, N]: ||<q_s, y_i>||^2
    if weights is not None:
        captured = captured / weights[:, None, :]
    captured = (captured * mask[:, None, :]).sum(-1).cumsum(-1)  # [B, k]
    total = (energy_x * mask).sum(-1, keepdim=True)
    share = (captured / total.clamp_min(1e-30)).clamp_max(1.0)  # float32 round-off above 1
    return torch.where(total > 0, share, torch.ones_like(share))
