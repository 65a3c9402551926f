"""An image-only Qwen2.5-VL processor, usable without torchvision.

transformers 5's `Qwen2_5_VLProcessor` insists on a video processor, whose class is a
torchvision dummy here; this subclass drops it (ENVIRONMENT.md §2). Non-goal: video.
"""

from __future__ import annotations

from transformers import Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` with only an image processor and a tokenizer."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", "<|image_pad|>")
        self.video_token = getattr(tokenizer, "video_token", "<|video_pad|>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
