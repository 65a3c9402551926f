"""Image-only Qwen2.5-VL and Qwen3-VL processors, usable without torchvision.

transformers 5's `Qwen2_5_VLProcessor` and `Qwen3VLProcessor` insist on a video processor,
whose class is a torchvision dummy here; these subclasses drop it (ENVIRONMENT.md §2).
Non-goal: video.
"""

from __future__ import annotations

from transformers import Qwen2_5_VLProcessor, Qwen3VLProcessor
from transformers.processing_utils import ProcessorMixin


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` with only an image processor and a tokenizer."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", "<|image_pad|>")
        self.video_token = getattr(tokenizer, "video_token", "<|video_pad|>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """`Qwen3VLProcessor` with only an image processor and a tokenizer (it returns
    ``mm_token_type_ids``, which our host-side positions do not need)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        names = {
            "image": "<|image_pad|>",
            "video": "<|video_pad|>",
            "vision_start": "<|vision_start|>",
            "vision_end": "<|vision_end|>",
        }
        for name, default in names.items():
            token = getattr(tokenizer, f"{name}_token", None) or default
            setattr(self, f"{name}_token", token)
            setattr(self, f"{name}_token_id", tokenizer.convert_tokens_to_ids(token))
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


IMAGE_ONLY = {"qwen2_5_vl": ImageOnlyQwen2_5_VLProcessor, "qwen3_vl": ImageOnlyQwen3VLProcessor}

DEFAULT_MAX_PIXELS = 1280 * 28 * 28  # 1,003,520 px: at most 1280 merged tokens per image


def limit_pixels(
    image_processor, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, min_pixels: int | None = None
) -> None:
    """Bound the pixels Qwen's processor resizes an image to (it resizes, never rejects).

    The checkpoint's own ``max_pixels`` (12.8 MP for Qwen2.5-VL) turns a phone photo into
    ~16k merged tokens (a 1 GB float32 Gram matrix in the selector); ``max_pixels`` caps it
    (the smaller of the two wins, so a checkpoint with a lower cap keeps it; None keeps the
    checkpoint's). ``min_pixels`` replaces the checkpoint's lower bound (None keeps it). An
    image then holds at most ``max_pixels / (28 * 28)`` merged tokens.
    """
    from transformers.image_utils import SizeDict

    size = image_processor.size
    high = size.longest_edge if max_pixels is None else min(max_pixels, size.longest_edge)
    low = size.shortest_edge if min_pixels is None else min_pixels
    if low > high:
        raise ValueError(
            f"model.min_pixels ({low}) is above the effective max_pixels ({high}): the "
            "smaller of model.max_pixels and the checkpoint's"
        )
    image_processor.size = SizeDict(shortest_edge=low, longest_edge=high)
