"""vLLM model classes that take a different number of kept image embeddings per request.

vLLM's LLaVA and LLaVA-NeXT accept pre-computed image embeddings and size each request's
placeholder run from the embedding length, but their input schema demands one feature size
across all requests an engine step batches together, so pruned requests with different K
fail as soon as the scheduler puts them in one step ("data contains inconsistent shapes").
These subclasses only mark that dimension dynamic, as vLLM does for pixel inputs; the
embeddings then pass through unchanged. They are registered under their own architecture
names (a ``vllm.general_plugins`` entry point, so vLLM's engine processes see them too) and
selected with ``hf_overrides``; stock LLaVA models in the same environment are untouched.
"""

from __future__ import annotations

from typing import Annotated

import torch
from vllm.model_executor.models.interns1 import (
    InternS1ForConditionalGeneration,
    InternS1ImageEmbeddingInputs,
)
from vllm.model_executor.models.llava import (
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
)
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextImageEmbeddingInputs,
)
from vllm.utils.tensor_schema import TensorShape

KEPT_SHAPE = TensorShape("bn", "ifs", "hs", dynamic_dims={"ifs"})


class KeptLlavaEmbeddings(LlavaImageEmbeddingInputs):
    """LLaVA image embeddings whose feature size may differ per image."""

    data: Annotated[torch.Tensor | list[torch.Tensor], KEPT_SHAPE]


class KeptLlavaNextEmbeddings(LlavaNextImageEmbeddingInputs):
    """LLaVA-NeXT image embeddings (kept tokens plus kept newlines) of any length per image."""

    data: Annotated[torch.Tensor | list[torch.Tensor], KEPT_SHAPE]


class PrunedLlava(LlavaForConditionalGeneration):
    """LLaVA-1.5 taking kept image embeddings of a different length per request."""

    def _parse_and_validate_image_input(self, **kwargs: object):
        embeds = kwargs.get("image_embeds")
        if embeds is None:
            return super()._parse_and_validate_image_input(**kwargs)
        return KeptLlavaEmbeddings(type="image_embeds", data=embeds)


class PrunedLlavaNext(LlavaNextForConditionalGeneration):
    """LLaVA-NeXT taking kept image embeddings of a different length per request."""

    def _parse_and_validate_image_input(self, **kwargs: object):
        embeds = kwargs.get("image_embeds")
        if embeds is None:
            return super()._parse_and_validate_image_input(**kwargs)
        return KeptLlavaNextEmbeddings(type="image_embeds", data=embeds)


class KeptInternVLEmbeddings(InternS1ImageEmbeddingInputs):
    """InternVL image embeddings (kept tokens of all tiles) of any length per image."""

    data: Annotated[
        torch.Tensor | list[torch.Tensor],
        TensorShape("ni", "tifs", "hs", dynamic_dims={"tifs"}),
    ]


class PrunedInternVL(InternS1ForConditionalGeneration):
    """InternVL taking kept image embeddings of a different length per request (vLLM wraps
    each run in ``<img>`` ... ``</img>`` itself: the engine sends the run without them)."""

    def _parse_and_validate_image_input(self, **kwargs: object):
        embeds = kwargs.get("image_embeds")
        if embeds is None:
            return super()._parse_and_validate_image_input(**kwargs)
        return KeptInternVLEmbeddings(type="image_embeds", data=embeds)
