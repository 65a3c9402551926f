"""Qwen2.5-VL through vLLM with pruned image tokens, on vLLM's own pruning path (EVS).

Stock vLLM sizes a Qwen2.5-VL image's placeholder run from its full grid
(``prod(grid_thw) // merge²``) and numbers M-RoPE positions from that grid, so K < N kept
embeddings fail ("Attempted to assign X multimodal tokens to Y placeholders"). vLLM already
prunes *video* tokens for this model (Efficient Video Sampling) and has a contract for it,
which this module reuses for images instead of reimplementing it:

* the processor fixes each item's placeholder count before the encoder runs: here
  `PrunedQwenProcessor` sizes the run to the K kept embeddings of the request;
* the model's ``embed_multimodal`` returns each item's kept embeddings with 4 trailing
  channels ``[t, h, w, offset]``: the kept tokens' M-RoPE positions relative to the image
  start, and where the text after the image resumes (EVS writes ``llm_grid_w`` there, the
  right value only for grids no taller than wide; we write what our positions say);
* vLLM's model runner strips the channels and calls the model's (stock, inherited)
  ``recompute_mrope_positions``, which places the kept tokens at their positions and shifts
  the text after them (V1 runner: ``GPUModelRunner._gather_mm_embeddings``, also the CPU
  runner's; Model Runner V2: ``MultiModalPruner.recompute``).

The runner takes that path only when ``MultiModalConfig.is_multimodal_pruning_enabled()``,
which vLLM ties to ``video_pruning_rate > 0``: the engine sets a rate and refuses videos
(``limit_mm_per_prompt={"video": 0}``), so the rate never prunes anything. Until the
recompute runs, `get_mrope_input_positions` numbers the prompt as plain text, which is exact
up to the image and rewritten from it on; prefix caching must stay off (a cache hit past the
image would skip the recompute), and the engine turns it off.

A request: ``{"prompt_token_ids": [... <|vision_start|> <|image_pad|> <|vision_end|> ...],
"multi_modal_data": {"image": {"image_embeds": [1, K, D], "image_mrope": [1, K, 4]}}}``.
The position channels travel in float32 (exact integers up to 2**24) whatever the model's
dtype: in bfloat16 positions above 256 would round; the embeddings are cast back to the
model's dtype, losslessly, when vLLM merges them.
Non-goals: videos, several images per prompt, pixel inputs with pruning (vLLM's own path).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import Qwen2VLMultiModalDataParser
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import DictEmbeddingItems
from vllm.multimodal.processing import PromptReplacement

MROPE = "image_mrope"  # [K, 4] long per image: t, h, w relative to the image start; offset
EMBEDS = "image_embeds"


def _kept_fields(hf_inputs: Mapping[str, torch.Tensor]) -> Mapping[str, MultiModalFieldConfig]:
    """One image per leading index: embeddings [K, D] and their position channels [K, 4]."""
    return {
        EMBEDS: MultiModalFieldConfig.batched("image"),
        MROPE: MultiModalFieldConfig.batched("image", keep_on_cpu=True),
    }


class KeptImageParsing:
    """Data-parser mixin: parses ``{"image_embeds", "image_mrope"}`` dicts (the kept count
    sizes the run); anything else goes to the family's own parser."""

    embedding_fields: ClassVar = {
        **Qwen2VLMultiModalDataParser.embedding_fields,
        "image": {EMBEDS: "values", MROPE: "metadata"},
    }

    def _parse_image_data(self, data):
        if isinstance(data, dict) and MROPE in data:
            required, optional = self.embedding_field_sets("image")
            embeds, mrope = data.get(EMBEDS), data[MROPE]
            if embeds is not None and (embeds.ndim != 3 or embeds.shape[:2] != mrope.shape[:2]):
                raise ValueError(
                    f"image_embeds {tuple(embeds.shape)} and image_mrope {tuple(mrope.shape)} "
                    "must be [n, K, D] and [n, K, 4]"
                )
            if mrope.ndim != 3 or mrope.shape[-1] != 4:
                raise ValueError(f"image_mrope must be [n, K, 4], got {tuple(mrope.shape)}")
            return DictEmbeddingItems(
                data,
                modality="image",
                required_fields=required,
                optional_fields=optional,
                fields_factory=_kept_fields,
            )
        return super()._parse_image_data(data)


class PrunedQwenDataParser(KeptImageParsing, Qwen2VLMultiModalDataParser):
    """Qwen2.5-VL's parser with kept-embeddings images."""


class PrunedQwenProcessingInfo(Qwen2_5_VLProcessingInfo):
    def get_data_parser(self):
        return PrunedQwenDataParser(
            self.get_hf_config().vision_config.spatial_merge_size,
            video_needs_metadata=True,
            expected_hidden_size=self._get_expected_hidden_size(),
            allow_missing_mm_embeddings=self.allow_missing_mm_embeddings,
        )


class KeptRun:
    """Processor mixin: sizes a kept-embeddings image's placeholder run to its K kept tokens
    (the family's own run, from the full grid, for pixel inputs)."""

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        if MROPE in hf_inputs:  # our embeddings pass through the processor untouched
            return _kept_fields(hf_inputs)
        return super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs)

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))
        token = self.info.get_hf_config().image_token_id
        for n, update in enumerate(updates):
            if update.modality != "image":
                continue
            grid_run = update.replacement

            def kept_run(item_idx: int, grid_run=grid_run):
                item = out_mm_kwargs["image"][item_idx]
                if MROPE in item:
                    return [token] * int(item[MROPE].data.shape[0])
                return grid_run(item_idx)  # pixel inputs (vLLM's profiling): the full grid

            updates[n] = PromptReplacement(
                modality="image", target=update.target, replacement=kept_run
            )
        return updates


class PrunedQwenProcessor(KeptRun, Qwen2_5_VLMultiModalProcessor):
    """Qwen2.5-VL's processor with kept-embeddings images."""


class KeptModel:
    """Model mixin: kept embeddings with 4 position channels, plain-text provisional
    positions (the runner's ``recompute_mrope_positions`` fixes them)."""

    def embed_multimodal(self, **kwargs: object):
        """The batch's kept embeddings, or vLLM's own pixel path when it has none."""
        return kept_embeddings(self, kwargs) or super().embed_multimodal(**kwargs)

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]):
        """Plain-text numbering for prompts with kept embeddings: exact up to the image; the
        runner's ``recompute_mrope_positions`` rewrites the image and what follows it."""
        if not any(f.data is not None and MROPE in f.data for f in mm_features):
            return super().get_mrope_input_positions(input_tokens, mm_features)
        n = len(input_tokens)
        return torch.arange(n, dtype=torch.long).expand(3, n).clone(), 0


@MULTIMODAL_REGISTRY.register_processor(
    PrunedQwenProcessor,
    info=PrunedQwenProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class PrunedQwen2_5_VL(KeptModel, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL taking kept image embeddings with their own M-RoPE positions."""


def kept_embeddings(model, kwargs: dict) -> tuple[torch.Tensor, ...] | None:
    """Each kept image's embeddings with its 4 position channels (float32), or None when the
    batch has no kept embeddings (vLLM's own pixel path then)."""
    mrope = kwargs.get(MROPE)
    if mrope is None:
        return None
    if not model.is_multimodal_pruning_enabled:
        raise RuntimeError(
            "kept Qwen embeddings need vLLM's multimodal pruning path "
            "(video_pruning_rate > 0 and no videos); build the engine with resprune's "
            "VllmEngine, which sets it"
        )
    if kwargs.get("pixel_values") is not None or kwargs.get("pixel_values_videos") is not None:
        raise ValueError("kept image embeddings cannot share a batch with pixel inputs")
    embeds = _items(kwargs[EMBEDS])
    positions = _items(mrope)
    return tuple(
        torch.cat([e.to(torch.float32), p.to(e.device, torch.float32)], dim=1)
        for e, p in zip(embeds, positions, strict=True)
    )


def _items(value: object) -> Sequence[torch.Tensor]:
    """Per-image 2-D tensors from a batched field: a stacked [n, K, C] tensor or a list."""
    if isinstance(value, torch.Tensor):
        return list(value) if value.ndim == 3 else [value]
    return [v for v in value]  # type: ignore[union-attr]
