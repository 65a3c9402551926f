"""Qwen3-VL (dense and MoE) through vLLM with pruned image tokens and their DeepStack rows.

The same path as Qwen2.5-VL's (`resprune.engines.vllm_qwen`: vLLM's own EVS contract, the
placeholder run sized to the K kept embeddings, 4 position channels per kept embedding that
the model runner strips and turns into M-RoPE positions), plus DeepStack: vLLM's Qwen3-VL
takes an image's embeddings as [K, D x (1 + levels)], each row the token's feature followed
by its rows of every DeepStack level in level order, and splits them itself before it adds
the levels to the first decoder layers at the image positions. The engine sends exactly the
kept rows (`Plan.side`, pruned by the same index as the features), so vLLM's DeepStack sees
what the transformers engine's does.

Channels: stock Qwen3-VL uses 5 (``[t, h, w, is_vision_start, is_vision]``, for its video
frames with timestamps) and resumes the text after an image at its largest kept position + 1,
which is not the unpruned offset once the last row or column is dropped. Our model appends
Qwen2.5-VL's 4 (``[t, h, w, offset]``) and recomputes with Qwen2.5-VL's rule, which places
the text where our positions say.
Non-goals: videos, several images per prompt, pixel inputs with pruning.
"""

from __future__ import annotations

from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalDataParser,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl_moe import (
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLMoeProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from resprune.engines.vllm_qwen import KeptImageParsing, KeptModel, KeptRun


class PrunedQwen3DataParser(KeptImageParsing, Qwen3VLMultiModalDataParser):
    """Qwen3-VL's parser with kept-embeddings images."""


def _parser(info) -> PrunedQwen3DataParser:
    return PrunedQwen3DataParser(
        info.get_hf_config().vision_config.spatial_merge_size,
        video_needs_metadata=True,
        expected_hidden_size=info._get_expected_hidden_size(),
        allow_missing_mm_embeddings=info.allow_missing_mm_embeddings,
    )


class PrunedQwen3ProcessingInfo(Qwen3VLProcessingInfo):
    def get_data_parser(self):
        return _parser(self)


class PrunedQwen3MoeProcessingInfo(Qwen3VLMoeProcessingInfo):
    def get_data_parser(self):
        return _parser(self)


class PrunedQwen3Processor(KeptRun, Qwen3VLMultiModalProcessor):
    """Qwen3-VL's processor with kept-embeddings images."""


class KeptQwen3(KeptModel):
    """Model mixin: `KeptModel` (DeepStack rows ride in the kept embeddings) with
    Qwen2.5-VL's recompute."""

    recompute_mrope_positions = Qwen2_5_VLForConditionalGeneration.recompute_mrope_positions


@MULTIMODAL_REGISTRY.register_processor(
    PrunedQwen3Processor, info=PrunedQwen3ProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
class PrunedQwen3_VL(KeptQwen3, Qwen3VLForConditionalGeneration):
    """Qwen3-VL taking kept image embeddings, DeepStack rows and M-RoPE positions."""


@MULTIMODAL_REGISTRY.register_processor(
    PrunedQwen3Processor,
    info=PrunedQwen3MoeProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class PrunedQwen3_VLMoe(KeptQwen3, Qwen3VLMoeForConditionalGeneration):
    """Qwen3-VL-MoE taking kept image embeddings, DeepStack rows and M-RoPE positions."""
