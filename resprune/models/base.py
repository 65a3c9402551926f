"""What every model family shares: the loaded-model handle, the adapter protocol, the registry.

An adapter knows five things about its family: how to run the vision tower + projector on a
batch of prepared items (`Encoded`: the features, plus per-visual-row side tensors such as
Qwen3-VL's DeepStack levels, which follow the kept rows), how the packed visual features of
one image split into crops (with grids) and layout-only rows (LLaVA-NeXT's
``image_newline``), how to give the kept sequence its positions, which per-token extras the
kept prompt carries (Gemma 3's ``token_type_ids``), and how the model takes the kept
features back (`Adapter.encoder_output`). Layouts, positions and extras are host metadata
(numpy, or CPU tensors for crop indices), computed from the prepared item alone: they never
read the device. Batching, padding and ``generate`` live in `resprune.answer` and
`resprune.engines`; docs/adding-a-family.md lists what a new family provides.
Non-goal: video, multi-image prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from resprune.items import PreparedItem

POSITION_POLICIES = ("original", "contiguous")


@dataclass
class Crop:
    """Visual tokens of one crop: their indices into the packed features, and their grid."""

    index: torch.Tensor  # long [n], ascending, into the image's packed features
    grid: tuple[int, int] | None  # (rows, cols) when the crop is a row-major grid


@dataclass
class Layout:
    """How one image's packed features split into selectable crops and layout-only rows."""

    crops: list[Crop]
    # (index of a layout token, indices of the tokens of its row): kept iff a row token is kept
    newline_rows: list[tuple[int, torch.Tensor]] = field(default_factory=list)


@dataclass
class Encoded:
    """An adapter's vision output for a batch: per item, the packed features and, for
    families that feed more per visual token than its embedding, the side rows."""

    features: list[torch.Tensor]  # [N_i, D] projector outputs, packed as the LLM sees them
    # [N_i, S, D_s] per item, or None: row j belongs to feature row j and is kept, dropped
    # and reordered with it (Qwen3-VL: the S DeepStack levels)
    side: list[torch.Tensor] | None = None


class Adapter(Protocol):
    """Family-specific hooks used by `resprune.answer.answer_batch` and the engines."""

    family: str

    def encode(self, model, items: list[PreparedItem]) -> Encoded:
        """Projector outputs per item (and side rows, if the family has any)."""
        ...

    def layout(self, model, item: PreparedItem, n: int) -> Layout:
        """Crops and layout rows of one item's ``n`` packed features."""
        ...

    def positions(self, model, item: PreparedItem, keep: np.ndarray, policy: str) -> np.ndarray:
        """Position ids [R, L'] of the kept prompt ``item.input_ids[keep]`` (R = 1, or 3 for
        M-RoPE), computed on the host from the prepared item (no device work, no sync)."""
        ...

    def token_extras(self, model, item: PreparedItem, keep: np.ndarray) -> dict[str, np.ndarray]:
        """Per-token inputs of the kept prompt besides its ids, by the model's keyword
        (int64 [L'] each; the engine pads them with 0), computed on the host."""
        ...

    def encoder_output(
        self, model, features: list[torch.Tensor], side: list[torch.Tensor] | None
    ) -> BaseModelOutputWithPooling:
        """The kept features (and side rows) of a batch, in the object the model takes as
        ``mm_encoder_outputs["image"]``."""
        ...


class AdapterDefaults:
    """The hooks most families share: no per-token extras, features handed back as a list."""

    def token_extras(self, model, item: PreparedItem, keep: np.ndarray) -> dict[str, np.ndarray]:
        """None: the kept ids and positions are all the model needs."""
        return {}

    def encoder_output(
        self, model, features: list[torch.Tensor], side: list[torch.Tensor] | None
    ) -> BaseModelOutputWithPooling:
        """The per-item feature list, as ``get_image_features`` returns it."""
        return BaseModelOutputWithPooling(pooler_output=features)


class ConcatEncoderOutput:
    """Mixin for families whose model scatters the kept features as one tensor, not a list
    (Gemma 3, InternVL); list it before `AdapterDefaults` in the bases."""

    def encoder_output(
        self, model, features: list[torch.Tensor], side: list[torch.Tensor] | None
    ) -> BaseModelOutputWithPooling:
        """The kept features as one [sum K, D] tensor."""
        return BaseModelOutputWithPooling(pooler_output=torch.cat(features))


@dataclass
class VLM:
    """A loaded vision-language model with its family adapter and tokenizer."""

    family: str
    model: torch.nn.Module
    tokenizer: object
    adapter: Adapter
    name: str
    device: torch.device
    local_path: str = ""  # the checkpoint folder it was loaded from (or the hub id)
    # the engine `answer_batch` uses when given none, built on first use and kept, so its
    # static caches and compiled decode persist across calls
    default_engine: object | None = field(default=None, repr=False, compare=False)
    revision: str | None = None  # the hub revision it was loaded at

    def describe(self) -> dict:
        """Model shape for FLOPs estimates and run summaries.

        For a mixture-of-experts LLM (Qwen3-VL-MoE) ``intermediate_size`` is the MLP width a
        token runs through (experts per token x each expert's width), so FLOPs estimates count
        the active parameters; ``text_parameters`` counts them all (what memory holds) and
        ``text_active_parameters`` what one token uses."""
        text = self.model.config.get_text_config(decoder=True)
        total = sum(p.numel() for p in self.model.parameters())
        llm = [self.model.model.language_model, self.model.lm_head]
        text_params = sum(p.numel() for m in llm for p in m.parameters())
        experts = getattr(text, "num_experts", None) or 0
        top_k = getattr(text, "num_experts_per_tok", None) or 0
        ff = text.intermediate_size
        active = text_params
        if experts and top_k:
            ff = top_k * text.moe_intermediate_size
            expert_params = sum(
                p.numel()
                for n, p in self.model.model.language_model.named_parameters()
                if ".experts." in n
            )
            active = text_params - expert_params + expert_params * top_k // experts
        return {
            "name": self.name,
            "family": self.family,
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "parameters": total,
            "text_parameters": text_params,
            "text_active_parameters": active,
            "vision_parameters": total - text_params,
            "hidden_size": text.hidden_size,
            "num_layers": text.num_hidden_layers,
            "intermediate_size": ff,
            "experts": experts,
            "experts_per_token": top_k,
            "num_heads": text.num_attention_heads,
            "num_kv_heads": text.num_key_value_heads,
            # Gemma 3's query width (heads x head_dim) is not its hidden size
            "head_dim": getattr(text, "head_dim", None)
            or text.hidden_size // text.num_attention_heads,
            "vocab": text.vocab_size,
            "context": text.max_position_embeddings,
            # set by resprune.tiny: the weights are random, the answers noise
            "tiny_random": bool(getattr(self.model.config, "resprune_tiny_random", False)),
        }


def sync(device: torch.device) -> None:
    """Wait for queued device work so wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def square_grid(n: int) -> tuple[int, int] | None:
    """(s, s) when ``n`` is a perfect square, else None."""
    side = round(n**0.5)
    return (side, side) if side * side == n else None


def text_positions(keep: np.ndarray, policy: str) -> np.ndarray:
    """1-D positions [1, L'] of the kept tokens (bool ``keep`` over the prompt, on the host):
    original (with gaps) or contiguous."""
    if policy not in POSITION_POLICIES:
        raise ValueError(f"position_policy must be one of {POSITION_POLICIES}, got {policy!r}")
    kept = np.flatnonzero(keep) if policy == "original" else np.arange(int(keep.sum()))
    return kept[None].astype(np.int64)
