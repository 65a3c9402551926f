"""Memory turned into batch size: what one model batch holds on the device, and the budget.

`BatchMemory` estimates the device bytes of one model batch beyond the weights, from the
model's config alone (no weights), buffer by buffer. Some buffers outlive the batch, the
rest live in one phase of it, so the peak is what persists plus the largest phase:

* **kv** (persists): the static cache (the default on CUDA) is one pool grown to the largest
  shape seen (`resprune.engines.static_cache`): `batch_bucket`(n) rows of
  `length_bucket`(longest) tokens, since left padding gives every row the longest item's
  length and the engine rounds both up (`resprune.engines.hf`). A dynamic cache is
  n x longest, and lives in the prefill phase instead.
* **graphs** (persists): the selector's CUDA-graph static input at its bucket
  (`resprune.select._bucket`: [S, N, N] float32, up to twice that: the inputs grow twofold)
  and the captured outputs; the compiled decode graph's pool (one decode step's transients
  and logits per row). Only with CUDA graphs (``cuda_graphs``; none on the CPU).
* Persistent buffers never shrink: the KV pool and the graphs' buffers are charged at least
  at the largest batch the actor has run (`BatchMemory.ran`, told by the packer).
* **vision** phase: per image, all images at once, the tower's hidden states (for a LLaVA
  family with a ``vision_feature_layer``, transformers keeps every CLIP layer's output:
  layers + 1 of [tokens, width] per tile), one layer's transients (q, k, v, attention
  output, MLP) and the projector's (InternVL: per tile, the thumbnail included; InternVL's
  and Gemma 3's towers keep only their input and last hidden state); Qwen2.5-VL's and
  Qwen3-VL's towers keep only the last hidden state (4 patches per merged token) and add the
  merger (Qwen3-VL: one more per DeepStack level), and their pixel tensors (copied in as
  float32, then cast). With eager attention, the score matrices and their softmax (one
  layer at a time). Plus the features [N, D] it returns (Qwen3-VL: [N, 1 + levels, D] with
  the DeepStack rows, which follow the features through selection and prefill).
* **selection** phase (when the pruner selects): the features and their padded copy, per crop
  set (S sets of N tokens) the float32 Gram and the weight product while it is scaled, and
  four [S, k, N] float32 coefficient-sized tensors.
* **prefill** phase: the features and the gather source of the kept ones, the padded prompt
  [rows, longest prompt] x one decoder layer's transients per token ((6 hidden + 3
  intermediate) x dtype: q, k, v, attention output, residual and norm; MLP gate, up,
  activation), the attention mask [rows, prompt, cache length] and the float32 logits of
  each row's last position; with eager attention, one layer's scores and softmax.

Checked against measurement (`tests/test_memory.py`): the peak of live tensor bytes of a real
`answer_batch` at small geometry on the CPU (``max_memory_allocated`` on CUDA) is at most the
estimate, and the estimate at most twice it.

A batch fits when kv + graphs + its largest phase is within the actor's budget
(`device_budget`): its share of the GPU (total x ``gpus_per_actor``, at most what is free)
less what the process already holds, less RESERVE_SHARE for the CUDA context, cuBLAS
workspaces, compiled decode graphs and allocator fragmentation. `pipeline.stages.answer`
packs batches under it, and an out-of-memory that gets through anyway shrinks the actor's
budget (see there). On the CPU ``auto`` is DEFAULT_CPU_BATCH_TOKENS LLM tokens (host memory
is not the limit there; time is).

Worked example (`tests/test_memory.py`): H200 (141 GB), LLaVA-1.5-7B in bf16, keep 64, 32 new
tokens. The LLM-only rule (KV + activations per token, 15 % kept back) allowed ~1,076 items
a batch: at their real footprint that is ~109 GB of KV (1,080 rows x 192 tokens) plus a
~67 GB vision phase (CLIP's 25 kept hidden states alone are ~31 GB) in a ~107 GB budget.
The whole-batch estimate packs 648.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_CPU_BATCH_TOKENS = 16384
RESERVE_SHARE = 0.15
MERGED_PATCHES = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")  # families with a Qwen tower
TILED = ("llava_next", "internvl")  # families whose pixel_values are one image's tiles


def _side(vision_config: Any) -> int:
    """Patches along one side of a tile (image_size and patch_size may be [h, w] pairs)."""
    size, patch = vision_config.image_size, vision_config.patch_size
    size = size[0] if isinstance(size, list | tuple) else size
    patch = patch[0] if isinstance(patch, list | tuple) else patch
    return size // patch


def kv_bytes_per_token(text_config: Any, dtype: torch.dtype) -> int:
    """KV-cache bytes one token holds: layers x kv heads x head_dim x 2 (K, V) x dtype bytes."""
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    size = torch.empty((), dtype=dtype).element_size()
    return text_config.num_hidden_layers * kv_heads * head_dim * 2 * size


def activation_bytes_per_token(text_config: Any, dtype: torch.dtype) -> int:
    """Transient bytes per token while one decoder layer runs (see the module docstring)."""
    size = torch.empty((), dtype=dtype).element_size()
    return (6 * text_config.hidden_size + 3 * text_config.intermediate_size) * size


def batch_token_budget(free_bytes: int, text_config: Any, dtype: torch.dtype) -> int:
    """LLM tokens whose KV and activations fit in ``free_bytes`` with the reserve kept back.

    The LLM part alone: `BatchMemory` is the whole batch (vision, selector, padding)."""
    per_token = kv_bytes_per_token(text_config, dtype) + activation_bytes_per_token(
        text_config, dtype
    )
    return max(1, int(free_bytes * (1 - RESERVE_SHARE)) // per_token)


@dataclass(frozen=True)
class ItemMemory:
    """One item's share of a batch: its LLM tokens and what its image holds."""

    cost: int  # LLM tokens: pruned prompt + new tokens (what `pack` counts)
    tower: int  # bytes: vision tower and projector activations while the tower runs
    features: int  # bytes: the projector outputs [N, D]
    sets: int  # crop sets it gives the selector (0: the pruner builds no Gram)
    set_tokens: int  # tokens of its largest set
    keep: int  # picks per set (the selector's k)


@dataclass(frozen=True)
class BatchShape:
    """A batch being packed, summed item by item (`BatchMemory.add`)."""

    items: int = 0
    longest: int = 0  # the longest item's LLM tokens
    tower: int = 0
    features: int = 0
    sets: int = 0
    set_tokens: int = 0
    keep: int = 0


class BatchMemory:
    """Device bytes of a model batch beyond the weights (see the module docstring)."""

    def __init__(
        self,
        config: Any,
        dtype: torch.dtype,
        *,
        max_new_tokens: int,
        static_cache: bool = True,
        bucketed: bool = True,
        cuda_graphs: bool = True,
    ):
        self.config = config
        self.size = torch.empty((), dtype=dtype).element_size()
        self.text = config.get_text_config(decoder=True)
        self.family = getattr(config, "model_type", "llava")
        self.new_tokens = max_new_tokens
        self.static, self.bucketed = static_cache, bucketed and static_cache
        self.cuda_graphs = cuda_graphs  # the selector's and the decode's (False on the CPU)
        self.vision_eager = _attention(config.vision_config) == "eager"
        self.text_eager = _attention(self.text) == "eager"
        self.persistent: dict[str, int] = {"kv": 0, "graphs": 0}  # the largest ones run
        self.kv = kv_bytes_per_token(self.text, dtype)
        # Qwen3-VL's DeepStack levels: side rows as wide as the features, held with them
        self.deepstack = len(getattr(config.vision_config, "deepstack_visual_indexes", ()) or ())
        self.act = activation_bytes_per_token(self.text, dtype)

    # ---- one item

    def item(
        self, item: Any, *, cost: int, keep: int | float | None, anyres: str = "per_crop"
    ) -> ItemMemory:
        """An item's `ItemMemory` from its prepared inputs; ``keep`` None: no selection."""
        from resprune.pruners import resolve_keep

        visual = int((item.input_ids == self.config.image_token_id).sum())
        features = visual * self.text.hidden_size * self.size * (1 + self.deepstack)
        tiles = item.pixel_values.shape[0] if self.family in TILED else 1
        if self.family in MERGED_PATCHES:
            pixels = item.pixel_values.shape[0] * item.pixel_values.shape[1]
            tower = self.qwen_tower_bytes(item.pixel_values.shape[0], visual)
            tower += pixels * (4 + self.size)  # the pixels copied in (float32), then cast
            sets, tokens = 1, visual
        else:
            tower = self.clip_tower_bytes(tiles)
            per_crop = self.family in TILED and anyres == "per_crop"
            sets, tokens = (tiles, min(self._tile_tokens(), visual)) if per_crop else (1, visual)
        if keep is None:
            return ItemMemory(cost, tower, features, 0, 0, 0)
        return ItemMemory(
            cost, tower, features, sets, tokens, min(tokens, resolve_keep(keep, visual))
        )

    def _tile_tokens(self) -> int:
        """Selectable tokens of one tile: LLaVA-NeXT's patch grid, InternVL's shuffled one."""
        side = _side(self.config.vision_config)
        if self.family == "internvl":
            return round(side * side * self.config.downsample_ratio**2)
        return side * side

    def clip_tower_bytes(self, tiles: int) -> int:
        """LLaVA / LLaVA-NeXT (CLIP), InternVL (InternViT) and Gemma 3 (SigLIP), per tile: the
        tower's kept hidden states and one layer's transients, and the projector's
        activations."""
        v = self.config.vision_config
        tokens = _side(v) ** 2 + (0 if self.family == "gemma3" else 1)  # + CLS
        layer = getattr(self.config, "vision_feature_layer", None)
        all_states = layer is not None and self.family in ("llava", "llava_next")
        kept = v.num_hidden_layers + 1 if all_states else 2  # all hidden states, or in + out
        width = self.text.hidden_size
        per_token = kept * v.hidden_size + 4 * v.hidden_size + 2 * v.intermediate_size + 3 * width
        scores = 2 * v.num_attention_heads * tokens * tokens if self.vision_eager else 0
        return tiles * (tokens * per_token + scores) * self.size

    def qwen_tower_bytes(self, patches: int, merged: int) -> int:
        """Qwen2.5-VL / Qwen3-VL: per patch, the hidden state in and out and one layer's
        transients (the rotary tables in float32); the merger per merged token, and Qwen3-VL's
        DeepStack mergers, one per level."""
        v = self.config.vision_config
        hidden, width = v.hidden_size, self.text.hidden_size
        per_patch = (8 * hidden + 3 * v.intermediate_size) * self.size + 2 * 4 * hidden // 8
        # eager attention: the scores and their softmax over one window of 4 x merge^2 tokens
        # (an upper bound for the windowed layers; the full-attention ones are per image)
        scores = 2 * v.num_attention_heads * patches * patches if self.vision_eager else 0
        mergers = (1 + self.deepstack) * merged * (2 * 4 * hidden + 2 * width) * self.size
        return patches * per_patch + mergers + scores * 4

    # ---- a batch

    def add(self, shape: BatchShape, item: ItemMemory) -> BatchShape:
        """``shape`` with ``item`` added."""
        return BatchShape(
            shape.items + 1,
            max(shape.longest, item.cost),
            shape.tower + item.tower,
            shape.features + item.features,
            shape.sets + item.sets,
            max(shape.set_tokens, item.set_tokens),
            max(shape.keep, item.keep),
        )

    def parts(self, shape: BatchShape) -> dict[str, int]:
        """The batch's bytes by part and phase (the module docstring says what each holds)."""
        from resprune.engines.hf import batch_bucket, length_bucket  # the engine's own rules

        n, longest = shape.items, shape.longest
        rows = batch_bucket(n) if self.bucketed else n
        length = length_bucket(longest) if self.bucketed else longest
        prompt = max(1, longest - self.new_tokens)
        cache = rows * length * self.kv
        graphs, gram = self.selector_bytes(shape.sets, shape.set_tokens, shape.keep)
        logits = rows * 2 * 4 * self.text.vocab_size
        prefill = rows * prompt * (self.act + 2 * length) + logits
        if self.text_eager:  # the scores and their softmax, one layer at a time
            prefill += 2 * rows * self.text.num_attention_heads * prompt * length * self.size
        if self.cuda_graphs and self.bucketed:  # the decode graph's pool: one step's transients
            graphs += rows * (self.act + 2 * length * self.size) + logits
        return {
            "kv": max(cache if self.static else 0, self.persistent["kv"]),
            "graphs": max(graphs, self.persistent["graphs"]),
            "vision": shape.tower + shape.features,
            "selection": 2 * shape.features + gram,
            "prefill": 2 * shape.features + prefill + (0 if self.static else cache),
        }

    def ran(self, shape: BatchShape) -> None:
        """Remember a batch that ran: the KV pool and the graphs' buffers stay at their
        largest size, so every later batch is charged at least those."""
        parts = self.parts(shape)
        for key in self.persistent:
            self.persistent[key] = max(self.persistent[key], parts[key])

    def bytes(self, shape: BatchShape) -> int:
        """The batch's peak: what persists plus its largest phase."""
        p = self.parts(shape)
        return p["kv"] + p["graphs"] + max(p["vision"], p["selection"], p["prefill"])

    def selector_bytes(self, sets: int, tokens: int, keep: int) -> tuple[int, int]:
        """(the CUDA graphs' static input and outputs, the selection phase's transients)."""
        if not sets:
            return 0, 0
        from resprune.select import _bucket

        bb, nb, kb = _bucket(sets, tokens, max(1, keep))
        # the static inputs grow to at least twice their size (resprune.select): up to 2x
        graphs = 4 * (2 * bb * nb * nb + 2 * bb * kb * nb) if self.cuda_graphs else 0
        return graphs, 4 * (2 * sets * tokens * tokens + 4 * sets * keep * tokens)

    def largest_batch(self, budget: int, item: ItemMemory, max_items: int = 1 << 16) -> int:
        """How many items like ``item`` fit one batch within ``budget`` bytes (at least 1)."""
        low, high = 1, max_items
        while low < high:
            mid = (low + high + 1) // 2
            shape = BatchShape(
                mid,
                item.cost,
                mid * item.tower,
                mid * item.features,
                mid * item.sets,
                item.set_tokens,
                item.keep,
            )
            low, high = (mid, high) if self.bytes(shape) <= budget else (low, mid - 1)
        return low


def _attention(config: Any) -> str | None:
    return getattr(config, "_attn_implementation", None)


def device_budget(device: torch.device, share: float = 1.0) -> int:
    """Bytes this actor's batches may use on ``device``: its share of the GPU (total x
    ``share``, at most what is free) less what the process holds now (weights, caches), less
    RESERVE_SHARE."""
    free, total = torch.cuda.mem_get_info(device)
    held = torch.cuda.memory_reserved(device)
    mine = free if share >= 1 else min(free, int(total * share) - held)
    return max(0, int(mine * (1 - RESERVE_SHARE)))


def resolve_batch_tokens(setting: int | str | None, device: torch.device) -> int | None:
    """``execution.max_batch_tokens`` as an LLM-token cap: ints and None pass; ``auto`` is
    DEFAULT_CPU_BATCH_TOKENS on the CPU and None on CUDA, where `BatchMemory` and
    `device_budget` size the batches instead."""
    if setting != "auto":
        return setting  # type: ignore[return-value]
    return None if device.type == "cuda" else DEFAULT_CPU_BATCH_TOKENS
