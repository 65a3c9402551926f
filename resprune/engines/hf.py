"""The transformers engine (reference and default): one left-padded greedy ``generate``.

The kept features go in as ``mm_encoder_outputs`` (in the object the family's adapter builds,
with their side rows, e.g. DeepStack levels), so the model's own merge places them in the
cut image-token run; explicit ``position_ids`` carry the kept tokens' positions (for M-RoPE,
row 0 is the 1-D text position transformers builds the causal mask from); the plan's
per-token extras (e.g. ``token_type_ids``) go in by name, left-padded with 0.

KV cache: ``dynamic`` (transformers' default, grows by concatenation) or ``static``
(preallocated, from a `CachePool`: fixed addresses per shape, memory of the largest shape).
On CUDA the static cache comes with transformers' compiled decode step (``torch.compile``,
mode ``reduce-overhead``: CUDA graphs); the prefill runs eagerly, so ``mm_encoder_outputs``
and the explicit positions work as in the dynamic path. To keep the number of compiled
shapes small over a long job, the batch is bucketed (1, 2, 4, 8, then multiples of 8; extra
rows are copies of the first plan, dropped afterwards) and the cache length is rounded up to
four steps per power of two (`length_bucket`: at most 25 % or 64 tokens over).

One compile per bucket, whatever the attention: the compiled decode step must see the same
shapes every step. sdpa and eager get a 4-D mask over the whole static cache (fixed shape);
flash_attention_2 gets the 2-D padding mask ``[B, L + t]``, one longer each step, so dynamo
would recompile every step (and FA2's unpadding breaks the graph). So when the decode is
compiled, a language model on any other attention is switched to sdpa (`fixed_shape_decode`;
the vision tower keeps its own, e.g. FA2): decode is memory-bound and a CUDA graph is what
makes it fast, while the prefill it also moves to sdpa is short once pruned.

Bounded compiles: the decode step is compiled with dynamic batch and cache-length dimensions
(``CompileConfig(dynamic=True)``), so inductor compiles at most COMPILES_PER_PROCESS graphs
per process whatever the prompt lengths: one for batch 1 (dynamo specialises size-1
dimensions) and one for every other (batch bucket, cache length). The buckets still bound the
CUDA graphs recorded (one per shape: a capture, not a compile).

Compile and capture are overhead, not model time: the first batch of each (batch bucket,
cache length) shape first runs a short warm-up ``generate`` of that shape on synthetic input
(the batch's longest plan with zeroed features, in every row: the shape, not the batch's
content; prefill and ``WARMUP_TOKENS - 1`` decode steps: compile, CUDA-graph record, first
replay), timed into `resprune.overhead`, which the callers subtract from the batch's time.
Growing the KV pool frees the cache tensors every earlier capture used, so it forgets every
warm-up: a shape seen before is warmed (re-captured) again, counted, before its next batch.
A whole batch fails together: ``generate`` raising is a batch failure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from transformers import CompileConfig

from resprune import overhead
from resprune.engines.base import Generation, Plan
from resprune.engines.static_cache import CachePool
from resprune.items import ItemError
from resprune.models.base import VLM

CACHES = ("auto", "static", "dynamic")
MIN_LENGTH_STEP = 64
COMPILES_PER_PROCESS = 2  # decode graphs inductor compiles: batch 1, and every other shape
RECOMPILE_LIMIT = 8  # dynamo's limit per code object, above COMPILES_PER_PROCESS
WARMUP_TOKENS = 4  # a new shape's warm-up: prefill + 3 decode steps (compile, record, replay)
FIXED_SHAPE_ATTENTION = ("sdpa", "eager")  # their decode mask spans the whole static cache


class TransformersEngine:
    """Greedy batched ``generate`` of the VLM's own language model.

    ``cache``: ``static``, ``dynamic`` or ``auto`` (static on CUDA, dynamic elsewhere).
    ``compile``: compile the static-cache decode step (default: on CUDA). ``bucket``: round
    batch and cache length up to buckets (default: when compiling). ``compile_config``:
    transformers' `CompileConfig` for the decode step (default: CUDA graphs, dynamic shapes).
    """

    name = "transformers"

    def __init__(
        self,
        vlm: VLM,
        *,
        cache: str = "auto",
        compile: bool | None = None,
        bucket: bool | None = None,
        compile_config: CompileConfig | None = None,
    ):
        if cache not in CACHES:
            raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
        cuda = vlm.device.type == "cuda"
        self.vlm = vlm
        self.static = cache == "static" or (cache == "auto" and cuda)
        self.compile = self.static and (cuda if compile is None else compile)
        self.bucket = self.static and (self.compile if bucket is None else bucket)
        self.compile_config = compile_config or CompileConfig(dynamic=True)
        if self.compile and not cuda:
            self.compile_config._compile_all_devices = True  # transformers compiles on CUDA only
        if self.compile:
            limit = torch._dynamo.config.recompile_limit
            torch._dynamo.config.recompile_limit = max(limit, RECOMPILE_LIMIT)
        model = vlm.model
        text = model.config.get_text_config(decoder=True)
        self.pool = CachePool(text, model.dtype, vlm.device) if self.static else None
        # language model's attention (before -> now) when the decode is compiled
        self.attention = fixed_shape_decode(model) if self.compile else None
        self.warmups: dict[tuple[int, int], float] = {}  # shape -> warm-up seconds

    def generate(self, plans: Sequence[Plan], max_new_tokens: int) -> list[Generation | ItemError]:
        """One left-padded ``generate`` over ``plans``; answers cut after the first EOS."""
        if not plans:
            return []
        rows = list(plans)
        if self.bucket:
            rows += [plans[0]] * (batch_bucket(len(plans)) - len(plans))
        ids, mask, positions = left_pad(self.vlm, rows)
        length = self._cache_length(ids.shape[1] + max_new_tokens)
        if self.compile and max_new_tokens > 1:
            self._warm_up(rows, length)
        out = self._generate(rows, ids, mask, positions, max_new_tokens, length)
        return decode(self.vlm, out[: len(plans), ids.shape[1] :].cpu())

    def _warm_up(self, rows: Sequence[Plan], length: int) -> None:
        """A new (rows, cache length) shape's pool growth, compile and capture, on synthetic
        input of that shape (`warm_up_plans`), counted as overhead."""
        key = (len(rows), length)
        if key in self.warmups:
            return
        with overhead.counted(f"decode {key[0]}x{key[1]}", self.vlm.device) as span:
            grown = self.pool.grows
            self.pool.get(*key)  # grown ahead, here: the growth moves every cache tensor
            if self.pool.grows != grown:
                self.warmups.clear()  # every earlier capture read the freed tensors
            synthetic = warm_up_plans(rows)
            ids, mask, positions = left_pad(self.vlm, synthetic)
            tokens = min(WARMUP_TOKENS, length - ids.shape[1])
            self._generate(synthetic, ids, mask, positions, tokens, length, min_new_tokens=tokens)
        self.warmups[key] = span.seconds

    def _generate(
        self, rows, ids, mask, positions, max_new_tokens: int, length: int, **extra
    ) -> torch.Tensor:
        model = self.vlm.model
        if hasattr(model.model, "rope_deltas"):
            model.model.rope_deltas = None  # cached M-RoPE state from an earlier call
        kwargs: dict = dict(extra)
        if self.static:
            kwargs["past_key_values"] = self.pool.get(len(rows), length)
            if self.compile:
                kwargs["compile_config"] = self.compile_config
            else:
                kwargs["disable_compile"] = True
        sides = [p.side for p in rows] if rows[0].side is not None else None
        features = self.vlm.adapter.encoder_output(model, [p.features for p in rows], sides)
        kwargs |= pad_extras(rows, ids.shape[1])
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            mm_encoder_outputs={"image": features},
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id(self.vlm),
            **kwargs,
        )

    def _cache_length(self, tokens: int) -> int:
        """Static-cache length for ``tokens`` (prompt + new): bucketed when bucketing."""
        return length_bucket(tokens) if self.bucket else tokens


def warm_up_plans(rows: Sequence[Plan]) -> list[Plan]:
    """Synthetic input of the batch's shape: its longest plan, features zeroed, in every row
    (the padded prompt and cache of the batch; none of its items' content)."""
    longest = max(rows, key=lambda p: len(p.ids))
    synthetic = dataclasses.replace(longest, features=torch.zeros_like(longest.features))
    return [synthetic] * len(rows)


def fixed_shape_decode(model) -> dict[str, str]:
    """Put the language model on an attention whose compiled decode keeps one shape.

    Any implementation but sdpa and eager (flash_attention_2: a 2-D mask that grows each
    step) is switched to sdpa for the language model (and the top-level config, which
    ``generate`` reads); the vision tower keeps its own. Returns {"before", "now"}.
    """
    text = model.config.get_text_config(decoder=True)
    before = text._attn_implementation
    if before not in FIXED_SHAPE_ATTENTION:
        keys = [k for k in model.config.sub_configs if getattr(model.config, k, None) is text]
        model.set_attn_implementation({"": "sdpa", **dict.fromkeys(keys, "sdpa")})
    return {"before": before, "now": text._attn_implementation}


def batch_bucket(n: int) -> int:
    """Rows a batch of ``n`` is padded to: 1, 2, 4, 8, then the next multiple of 8."""
    if n <= 8:
        return 1 << (n - 1).bit_length()
    return -(-n // 8) * 8


def length_bucket(n: int) -> int:
    """Cache length for ``n`` tokens: the next multiple of a quarter of n's power of two."""
    step = max(MIN_LENGTH_STEP, 1 << max(0, n.bit_length() - 3))
    return -(-n // step) * step


def decode(vlm: VLM, new: torch.Tensor) -> list[Generation | ItemError]:
    """Per row of new token ids: the ids up to the first EOS and their text."""
    eos = vlm.model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    answers: list[Generation | ItemError] = []
    for row in new.tolist():
        n = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
        text = vlm.tokenizer.decode(row[:n], skip_special_tokens=True).strip()
        answers.append(Generation(text, row[:n]))
    return answers


def left_pad(vlm: VLM, plans: Sequence[Plan]) -> tuple[torch.Tensor, ...]:
    """Left-pad ids, mask and positions; pads get position 0, as stock ``generate`` does."""
    b, length, rows = len(plans), max(len(p.ids) for p in plans), plans[0].positions.shape[0]
    ids = torch.full((b, length), pad_id(vlm), dtype=torch.long, device=vlm.device)
    mask = torch.zeros(b, length, dtype=torch.long, device=vlm.device)
    pos = torch.zeros(rows, b, length, dtype=torch.long, device=vlm.device)
    for i, p in enumerate(plans):
        n = len(p.ids)
        ids[i, length - n :], mask[i, length - n :], pos[:, i, length - n :] = p.ids, 1, p.positions
    if rows == 1:
        return ids, mask, pos[0]
    # M-RoPE: row 0 is the 1-D text position transformers uses to build the causal mask.
    text = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return ids, mask, torch.cat([text[None], pos])


def pad_extras(plans: Sequence[Plan], length: int) -> dict[str, torch.Tensor]:
    """The plans' per-token extras (`Plan.extras`), left-padded with 0 to ``length``."""
    padded = {}
    for key, first in plans[0].extras.items():
        out = torch.zeros(len(plans), length, dtype=first.dtype, device=first.device)
        for i, p in enumerate(plans):
            out[i, length - len(p.extras[key]) :] = p.extras[key]
        padded[key] = out
    return padded


def pad_id(vlm: VLM) -> int:
    """The tokenizer's pad id, else the model's EOS."""
    pad = vlm.tokenizer.pad_token_id
    return pad if pad is not None else vlm.model.generation_config.eos_token_id
