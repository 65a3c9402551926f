"""The transformers engine's static KV cache: bucketed, reused, compiled, and exact.

Keep-all through the static, bucketed path equals stock `generate`; static equals dynamic for
pruned batches of mixed sizes; padding rows to a bucket changes no real row; positions (M-RoPE
included) are the dynamic path's; the compiled decode step (dynamo, eager backend on CPU)
gives the same ids.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

from resprune.answer import answer_batch
from resprune.engines.hf import TransformersEngine, batch_bucket, length_bucket
from resprune.pruners import build_pruner
from tests.test_engines import Recording
from tests.vlm_helpers import (
    captured_positions,
    compiled_decode_answers,
    stock_generate,
    tiny_vlm_items,
)

NEW = 6


@pytest.fixture(scope="module", params=["llava", "llava_next", "qwen2_5_vl"])
def family(request, tmp_path_factory):
    return tiny_vlm_items(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def mixed_plans(family):
    """Five kept sequences of different lengths: three items at keep 8, then keep 24 and 30%."""
    vlm, items = family
    rec = Recording(vlm)
    for keep, subset in ((8, items), (24, items[1:2]), (0.3, items[:1])):
        answer_batch(
            vlm, subset, pruner=build_pruner("resprune"), keep=keep, max_new_tokens=1, engine=rec
        )
    return [p for call in rec.plans for p in call]


def ids(generations) -> list[list[int]]:
    return [g.token_ids for g in generations]


def test_keep_all_static_bucketed_equals_stock_generate(family):
    vlm, items = family
    engine = TransformersEngine(vlm, cache="static", bucket=True)
    results = answer_batch(vlm, items, pruner=None, keep=1.0, max_new_tokens=NEW, engine=engine)
    assert [r.answer_ids for r in results] == stock_generate(vlm, items, NEW)
    ((batch, length),) = engine.pool.caches  # 3 items ran as a bucket of 4 rows
    assert batch == 4 and length == length_bucket(max(r.prompt_tokens for r in results) + NEW)


def test_static_equals_dynamic_for_mixed_pruned_batch(family, mixed_plans):
    vlm, _ = family
    assert len({p.features.shape[0] for p in mixed_plans}) >= 3  # really mixed sizes
    dynamic = ids(TransformersEngine(vlm, cache="dynamic").generate(mixed_plans, 8))
    static = ids(TransformersEngine(vlm, cache="static").generate(mixed_plans, 8))
    bucketed = TransformersEngine(vlm, cache="static", bucket=True)
    assert static == dynamic
    assert ids(bucketed.generate(mixed_plans, 8)) == dynamic  # 5 rows padded to 8
    assert [key[0] for key in bucketed.pool.caches] == [8]


def test_bucket_rows_do_not_change_real_rows(family, mixed_plans):
    """Each row alone (padded to its bucket with copies of itself) gives the batch's ids."""
    vlm, _ = family
    engine = TransformersEngine(vlm, cache="static", bucket=True)
    together = ids(engine.generate(mixed_plans, 5))
    alone = [ids(engine.generate(mixed_plans[i : i + 1], 5))[0] for i in (0, 3)]
    assert alone == [together[0], together[3]]
    three = ids(engine.generate(mixed_plans[:3], 5))  # 3 rows padded to 4
    assert three == together[:3]


def test_static_positions_equal_dynamic(family, mixed_plans):
    """Prefill and decode positions of the real rows (M-RoPE: all 4 rows) are the same."""
    vlm, _ = family
    plans = mixed_plans[:3]
    seen = []
    for engine in (
        TransformersEngine(vlm, cache="dynamic"),
        TransformersEngine(vlm, cache="static", bucket=True),
    ):
        with captured_positions(vlm) as calls:
            engine.generate(plans, 4)
        seen.append([c[..., : len(plans), :] for c in calls])
    dynamic, static = seen
    assert len(dynamic) == len(static) >= 4
    assert all(torch.equal(a, b) for a, b in zip(dynamic, static, strict=True))


@pytest.mark.parametrize("family", ["llava"], indirect=True)  # family-independent bookkeeping
def test_cache_pool_shares_memory_and_keeps_addresses(family, mixed_plans):
    """Every shape's cache views the same buffers: fixed addresses, the largest shape's size."""
    vlm, _ = family
    engine = TransformersEngine(vlm, cache="static", bucket=True)
    pool = engine.pool

    def first_layer(key):
        return pool.caches[key].layers[0].keys

    engine.generate(mixed_plans[:3], 2)  # 3 rows -> bucket 4
    ((four, length),) = pool.caches
    assert four == 4
    address, size = first_layer((4, length)).data_ptr(), pool.buffers[0][0].numel()
    cache = pool.caches[(4, length)]
    engine.generate(mixed_plans[1:3], 2)  # 2 rows: its own cache, the same memory
    assert first_layer((2, length)).data_ptr() == address
    assert pool.buffers[0][0].numel() == size == first_layer((4, length)).numel()
    engine.generate(mixed_plans[:3], 2)  # the 4-row shape again: same object, same address
    assert pool.caches[(4, length)] is cache and first_layer((4, length)).data_ptr() == address
    engine.generate(mixed_plans, 2)  # 5 rows -> 8: buffers grow to the new largest shape
    ((eight, longest),) = pool.caches  # the smaller shapes' views went with the old buffers
    assert eight == 8 and longest >= length
    assert pool.buffers[0][0].numel() == first_layer((8, longest)).numel() >= 2 * size


@pytest.mark.parametrize("family", ["qwen2_5_vl"], indirect=True)  # M-RoPE: the hardest case
def test_compiled_decode_equals_stock_generate(family):
    """The compiled decode step (dynamo; eager backend, as CPUs have no CUDA graphs)."""
    vlm, items = family
    engine, results = compiled_decode_answers(vlm, items, NEW)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1 and not counters["graph_break"]  # one whole graph per decode step
    flipped = items[::-1]  # another batch of the same shape: no recompile, rows follow
    again = answer_batch(vlm, flipped, pruner=None, keep=1.0, max_new_tokens=NEW, engine=engine)
    assert counters["stats"]["unique_graphs"] == graphs
    assert [r.answer_ids for r in again] == [r.answer_ids for r in results][::-1]


@pytest.mark.parametrize("family", ["llava"], indirect=True)
def test_defaults_per_device(family):
    vlm, _ = family
    cpu = TransformersEngine(vlm)
    assert (cpu.static, cpu.compile, cpu.bucket) == (False, False, False)
    cuda = TransformersEngine(dataclasses.replace(vlm, device=torch.device("cuda")))
    assert (cuda.static, cuda.compile, cuda.bucket) == (True, True, True)
    with pytest.raises(ValueError, match="cache must be one of"):
        TransformersEngine(vlm, cache="paged")


def test_buckets():
    sizes = [1, 2, 3, 4, 5, 8, 9, 16, 17, 33]
    assert [batch_bucket(n) for n in sizes] == [1, 2, 4, 4, 8, 8, 16, 16, 24, 40]
    lengths = [1, 64, 65, 116, 256, 257, 638, 1025, 3000]
    assert [length_bucket(n) for n in lengths] == [64, 64, 128, 128, 256, 320, 640, 1280, 3072]
    for n in range(1, 5000):  # never short, at most 25 % or one 64-token step over
        assert n <= length_bucket(n) <= max(n + 63, n * 5 // 4)
