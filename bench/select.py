"""Benchmark: batched ResPrune selection vs per-image loops, at LLaVA geometry.

Prints a table and a final JSON line. Four ways to select k of N tokens for a batch of B
images with D channels:
  batched   - one `select_tokens` call on [B, N, D] (ours; a CUDA graph per bucket on CUDA)
  previous  - the selector before the rank-exhaustion / CUDA-graph change (eager loop), kept
              here so "CPU speed no worse than before" is a ratio measured in the same run
  per_image - a Python loop calling `select_tokens` on each [N, D]
  textbook  - a per-image loop of plain incremental Gram-Schmidt on the tokens themselves
              (after each pick, project every token on q: an O(N D) pass per step)
Run: python bench/select.py [--n 576 2880] [--k 64 128 192] [--batch 8] [--dim 4096]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as `python bench/select.py`, this folder heads sys.path and this file would shadow the
# standard library's `select` module that torch and subprocess import.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from functools import partial  # noqa: E402

import torch  # noqa: E402

from resprune import select_tokens  # noqa: E402


def textbook_select(tokens: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy pivoted Gram-Schmidt straight from the definition, one image."""
    y = tokens.float()
    energy = (y * y).sum(-1)
    basis: list[torch.Tensor] = []
    picks = []
    for _ in range(k):
        p = int(energy.argmax())
        picks.append(p)
        v = y[p].clone()
        for q in basis:
            v -= (q @ v) * q
        q = v / v.norm().clamp_min(1e-30)
        basis.append(q)
        energy = (energy - (y @ q) ** 2).clamp_min(0)
        energy[picks] = -1
    return torch.tensor(sorted(picks))


def previous_select(tokens: torch.Tensor, k: int) -> torch.Tensor:
    """The batched selector as it was before (pivoted Cholesky, eager loop, no relevance)."""
    y = tokens.float()
    b, n, _ = y.shape
    rows = torch.arange(b, device=y.device)
    gram = torch.bmm(y, y.transpose(1, 2))
    blocked = torch.zeros(b, n, dtype=torch.bool, device=y.device)
    energy = torch.diagonal(gram, dim1=1, dim2=2).clone()
    chosen = torch.empty(b, k, dtype=torch.long, device=y.device)
    coef = torch.zeros(b, n, k, device=y.device)
    for step in range(k):
        pick = energy.argmax(dim=-1)
        chosen[:, step] = pick
        resid = energy[rows, pick].clamp_min(0.0)
        col = (
            gram[rows, :, pick]
            - torch.bmm(coef[:, :, :step], coef[rows, pick, :step, None])[..., 0]
        )
        alive = resid > 1e-8 * gram[rows, pick, pick]
        col = torch.where(alive[:, None], col / resid.clamp_min(1e-30).sqrt()[:, None], 0.0)
        coef[:, :, step] = col
        blocked[rows, pick] = True
        energy = (energy - col * col).clamp_min(0.0).masked_fill(blocked, -1.0)
    return chosen.sort(dim=-1).values


def _loop(fn, x: torch.Tensor, k: int) -> list:
    return [fn(t, k) for t in x]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: str, repeat: int) -> float:
    fn()  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeat


def run(ns: list[int], ks: list[int], batch: int, dim: int, device: str, repeat: int) -> list[dict]:
    """Time the three variants for every (N, k); returns one row per configuration."""
    rows = []
    for n in ns:
        x = torch.randn(batch, n, dim, device=device)
        for k in ks:
            batched = _time(partial(select_tokens, x, k), device, repeat)
            previous = _time(partial(previous_select, x, k), device, repeat)
            per_image = _time(partial(_loop, select_tokens, x, k), device, repeat)
            textbook = _time(partial(_loop, textbook_select, x, k), device, 1)
            same = all(
                torch.equal(textbook_select(x[b], k).to(device), select_tokens(x[b], k).indices)
                for b in range(min(2, batch))
            )
            rows.append(
                {
                    "n": n,
                    "k": k,
                    "batch": batch,
                    "dim": dim,
                    "device": device,
                    "batched_ms_per_image": 1e3 * batched / batch,
                    "previous_ms_per_image": 1e3 * previous / batch,
                    "previous_over_batched": previous / batched,
                    "same_indices_as_previous": torch.equal(
                        previous_select(x, k), select_tokens(x, k).indices
                    ),
                    "per_image_ms_per_image": 1e3 * per_image / batch,
                    "textbook_ms_per_image": 1e3 * textbook / batch,
                    "speedup_vs_textbook": textbook / batched,
                    "same_indices_as_textbook": same,
                }
            )
            print(_format(rows[-1]), flush=True)
    return rows


def _format(r: dict) -> str:
    return (
        f"{r['device']:>4} N={r['n']:<5} k={r['k']:<4}"
        f" batched {r['batched_ms_per_image']:8.2f} ms/img"
        f" | previous {r['previous_ms_per_image']:8.2f} (x{r['previous_over_batched']:.2f})"
        f" | per-image loop {r['per_image_ms_per_image']:8.2f}"
        f" | textbook {r['textbook_ms_per_image']:8.2f}"
        f" | x{r['speedup_vs_textbook']:.1f} vs textbook"
        f" | same picks: {r['same_indices_as_textbook']}, {r['same_indices_as_previous']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[576, 2880])
    parser.add_argument("--k", type=int, nargs="+", default=[64, 128, 192])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, devices {devices}")
    rows = [r for d in devices for r in run(args.n, args.k, args.batch, args.dim, d, args.repeat)]
    print(json.dumps({"bench": "select", "results": rows}))


if __name__ == "__main__":
    main()
