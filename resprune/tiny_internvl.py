"""The tiny InternVL3.5 checkpoint (`resprune.tiny`): InternViT tiles of ``image_size`` px
(up to MAX_TILES plus a thumbnail), pixel-shuffled 2x2, a Qwen3 language model, and
InternVL's chat format (``<IMG_CONTEXT>`` expanded to ``<img>`` + tokens + ``</img>``)."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import InternVLConfig, PreTrainedTokenizerFast
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from resprune.models.internvl import ImageOnlyInternVLProcessor
from resprune.tiny_bpe import train_bpe

TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<video>",
]
PATCH = 14
MAX_TILES = 4


def tokenizer() -> PreTrainedTokenizerFast:
    """Qwen-style, with InternVL's image tokens under the names its processor reads."""
    return PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(SPECIALS),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )


def config_and_processor(tok, text: dict, vision: dict):
    """(InternVLConfig, image-only processor) for ``image_size`` px tiles."""
    size = vision["image_size"]
    per_tile = (size // PATCH // 2) ** 2
    config = InternVLConfig(
        vision_config={
            "hidden_size": vision["hidden_size"],
            "intermediate_size": 2 * vision["hidden_size"],
            "num_hidden_layers": vision["layers"],
            "num_attention_heads": 4,
            "image_size": [size, size],
            "patch_size": [PATCH, PATCH],
        },
        text_config={
            "model_type": "qwen3",
            **text,
            "head_dim": text["hidden_size"] // text["num_attention_heads"],
            "max_position_embeddings": 4096,
            "bos_token_id": tok.pad_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=per_tile,
        # as InternVL3.5-8B: a tied head in a 2-layer random model only echoes the last token
        tie_word_embeddings=False,
    )
    config.pad_token_id = tok.pad_token_id
    ip = GotOcr2ImageProcessorPil(
        size={"height": size, "width": size},
        crop_to_patches=True,
        min_patches=1,
        max_patches=MAX_TILES,
    )
    processor = ImageOnlyInternVLProcessor(
        image_processor=ip, tokenizer=tok, image_seq_length=per_tile, chat_template=TEMPLATE
    )
    return config, processor


def save_video_config(out: Path, size: int) -> None:
    """video_preprocessor_config.json, as the hub repos ship it: vLLM's InternVL processor
    loads a video processor (ours never uses one; without torchvision it is skipped)."""
    config = {
        "video_processor_type": "InternVLVideoProcessor",
        "processor_class": "InternVLProcessor",
        "size": {"height": size, "width": size},
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    }
    (out / "video_preprocessor_config.json").write_text(json.dumps(config, indent=2))
