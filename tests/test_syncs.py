"""No host synchronisation per item: stream-stalling ops around `answer_batch`, batch 8
against batch 1, per family (counted on the CPU by `tests/syncs.py`)."""

from __future__ import annotations

import pytest

from resprune.answer import answer_batch
from resprune.pruners import build_pruner
from tests.syncs import count_answer_batch_syncs, count_syncs
from tests.vlm_helpers import QUESTIONS, images, tiny_vlm

PER_BATCH = 3  # the picks read, the answers read, the statistics read


@pytest.mark.parametrize(
    "family", ["llava", "llava_next", "qwen2_5_vl", "qwen3_vl", "gemma3", "internvl"]
)
def test_no_sync_or_copy_per_item(family, tmp_path_factory):
    vlm, pre = tiny_vlm(family, tmp_path_factory)
    pictures = images()
    items = [pre.prepare(pictures[i % 3], QUESTIONS[i % 3]) for i in range(8)]
    kwargs = {"pruner": build_pruner("resprune"), "keep": 16, "max_new_tokens": 2}
    answer_batch(vlm, items, **kwargs)  # warm: first-call work is not what is measured
    # a tiled image alone (InternVL's square first picture is one tile: no crop gather)
    one = count_answer_batch_syncs(vlm, items[1:2], **kwargs)
    eight = count_answer_batch_syncs(vlm, items, **kwargs)
    assert eight.total <= len(items)  # the target: at most one per item
    assert eight.syncs == one.syncs and eight.total <= PER_BATCH, eight.syncs  # none per item
    assert eight.to_device == one.to_device  # host-to-device copies: per batch, not per item


def test_the_counter_sees_a_per_item_sync(tmp_path_factory):
    """The counter is not blind: a device read per item is counted."""
    import torch

    vlm, _ = tiny_vlm("llava", tmp_path_factory)
    weight = vlm.model.get_input_embeddings().weight.detach()
    with count_syncs(vlm.model) as counter:
        for i in range(4):
            float(weight[i].sum())
            (weight[i] > 0).nonzero()
            weight[i].tolist()
            weight[i].cpu().tolist()  # one read: the copy out; then host work
            weight[i].to("cpu")
            weight[i].to(device="cpu", dtype=torch.float64)
            weight[i].to(torch.float64)  # stays on the device: no read
        torch.arange(3).tolist()  # a host tensor: not a device read
        torch.arange(3).cpu().to("cpu")
    assert counter.syncs == {
        "aten._local_scalar_dense": 4,
        "aten.nonzero": 4,
        "Tensor.tolist": 4,
        "Tensor.cpu": 4,
        "Tensor.to(cpu)": 8,
    }
