"""Shared helpers for the model-family tests: tiny models, images, stock `generate`, hooks."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image
from transformers import CompileConfig

from resprune.answer import answer_batch
from resprune.engines.hf import TransformersEngine
from resprune.items import ItemResult, PreparedItem
from resprune.loading import load_preprocessor, load_vlm
from resprune.models.base import VLM
from resprune.tiny import build_tiny_checkpoint

QWEN = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
SIZES = [(336, 336), (300, 451), (500, 260)]  # (height, width): different anyres grids
QUESTIONS = ["What is the cat doing?", "How many red cars are on the street?", "Describe it."]


def tiny_vlm(family: str, tmp_path_factory, **sizes):
    """Build a tiny checkpoint of ``family`` and load it and its preprocessor."""
    path = build_tiny_checkpoint(family, tmp_path_factory.mktemp(family), **sizes)
    return load_vlm(str(path)), load_preprocessor(str(path))


def images(seed: int = 0) -> list[Image.Image]:
    """Random RGB images of different sizes (deterministic)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for h, w in SIZES]


def prepared(pre, n: int = 3) -> list[PreparedItem]:
    """The first ``n`` (image, question) pairs, prepared."""
    return [pre.prepare(im, q) for im, q in zip(images()[:n], QUESTIONS[:n], strict=True)]


def tiny_vlm_items(family: str, tmp_path_factory) -> tuple[VLM, list[PreparedItem]]:
    """A tiny ``family`` model and its first three prepared items (a module fixture's value)."""
    vlm, pre = tiny_vlm(family, tmp_path_factory)
    return vlm, prepared(pre)


def stock_generate(vlm, items: list[PreparedItem], max_new_tokens: int) -> list[list[int]]:
    """transformers' own batched `generate` on the unpruned prompts (left padding), up to EOS."""
    model, pad = vlm.model, vlm.tokenizer.pad_token_id
    length = max(len(it.input_ids) for it in items)
    ids = torch.full((len(items), length), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, it in enumerate(items):
        ids[b, length - len(it.input_ids) :] = torch.from_numpy(it.input_ids)
        mask[b, length - len(it.input_ids) :] = 1
    pixels = [torch.from_numpy(it.pixel_values) for it in items]
    stacked = vlm.family in ("llava", "gemma3")  # one image tensor each; the rest are packed
    kwargs = {"pixel_values": torch.stack(pixels) if stacked else torch.cat(pixels)}
    image = (ids == model.config.image_token_id).int()
    if vlm.family == "llava_next":
        kwargs["image_sizes"] = torch.stack([torch.from_numpy(it.image_sizes) for it in items])
    if vlm.family in QWEN:
        kwargs["image_grid_thw"] = torch.stack(
            [torch.from_numpy(it.image_grid_thw) for it in items]
        )
        kwargs["mm_token_type_ids"] = image
        model.model.rope_deltas = None
    if vlm.family == "gemma3":
        kwargs["token_type_ids"] = image
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        **kwargs,
    )
    eos = model.generation_config.eos_token_id
    rows = out[:, length:].tolist()
    return [row[: row.index(eos) + 1] if eos in row else row for row in rows]


@contextmanager
def captured_positions(vlm):
    """Collect the ``position_ids`` of every language-model forward (prefill first)."""
    calls: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        calls.append(kwargs["position_ids"].clone())

    handle = vlm.model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def real_rows(positions: torch.Tensor, item_index: int, length: int) -> torch.Tensor:
    """The last ``length`` (unpadded) positions of one batch row: [R, length] or [length]."""
    return positions[..., item_index, -length:]


def assert_pruned_counts(results, items, k: int) -> None:
    """Kept counts, prompt lengths and indices of pruned results (budget k per image).

    Without layout rows exactly min(k, N) tokens are kept; with LLaVA-NeXT's newlines the
    kept tokens and their newlines together stay within k.
    """
    for r, it in zip(results, items, strict=True):
        if r.kept_newlines == 0:
            assert r.kept_tokens == min(k, r.visual_tokens)
        assert r.kept_tokens <= min(k, r.visual_tokens)
        assert r.prompt_tokens_unpruned == len(it.input_ids)
        assert r.prompt_tokens == r.prompt_tokens_unpruned - (r.visual_tokens - r.kept_tokens)
        idx = r.kept_indices
        assert len(idx) == r.kept_tokens and idx == sorted(set(idx))
        assert idx[0] >= 0 and idx[-1] < r.visual_tokens
        assert 0.0 <= r.retained_energy <= 1.0 + 1e-4  # float32 rounding once k >= rank
        assert 1 <= r.new_tokens == len(r.answer_ids)


def original_1d_positions(item: PreparedItem, result, image_token_id: int) -> torch.Tensor:
    """Expected 1-D positions of the kept prompt: original ones, with gaps (independent)."""
    ids = torch.from_numpy(item.input_ids)
    start = int(torch.nonzero(ids == image_token_id)[0])
    n = result.visual_tokens
    kept = torch.tensor(result.kept_indices)
    return torch.cat([torch.arange(start), start + kept, torch.arange(start + n, len(ids))])


def compiled_decode_answers(
    vlm, items: list[PreparedItem], max_new_tokens: int
) -> tuple[TransformersEngine, list[ItemResult]]:
    """Keep-all answers through the static cache's compiled decode step (dynamo; eager
    backend, as CPUs have no CUDA graphs), checked equal to stock `generate` and to have taken
    transformers' compiled path; the engine and the results, for further checks."""
    config = CompileConfig(backend="eager", mode=None, dynamic=False)
    engine = TransformersEngine(vlm, cache="static", compile=True, compile_config=config)
    results = answer_batch(
        vlm, items, pruner=None, keep=1.0, max_new_tokens=max_new_tokens, engine=engine
    )
    assert [r.answer_ids for r in results] == stock_generate(vlm, items, max_new_tokens)
    assert hasattr(vlm.model, "_compiled_call")  # transformers took the compiled decode path
    return engine, results
