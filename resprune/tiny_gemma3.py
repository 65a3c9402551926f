"""The tiny Gemma 3 checkpoint (`resprune.tiny`): a SigLIP tower pooled to a square grid of
soft tokens, Gemma 3's text model with a sliding and a full attention layer, and its chat
format (``<bos>`` from the tokenizer and another from the template, as the real one does)."""

from __future__ import annotations

from tokenizers import processors
from transformers import Gemma3Config, Gemma3Processor, PreTrainedTokenizerFast
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

from resprune.tiny_bpe import train_bpe

TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<start_of_image>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
SPECIALS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]
PATCH = 14


def tokenizer() -> PreTrainedTokenizerFast:
    """Gemma-style: ``<bos>`` prepended, generation ends at ``<end_of_turn>``."""
    tok = train_bpe(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<end_of_turn>",
        pad_token="<pad>",
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )


def config_and_processor(tok, text: dict, vision: dict) -> tuple[Gemma3Config, Gemma3Processor]:
    """``image_size`` px images, PATCH px patches, pooled 2x2 into the soft tokens."""
    size = vision["image_size"]
    side = size // PATCH // 2
    heads = text["num_attention_heads"]
    head_dim = text["hidden_size"] // heads
    ids = tok.convert_tokens_to_ids
    config = Gemma3Config(
        text_config={
            **text,
            "head_dim": head_dim,
            "query_pre_attn_scalar": head_dim,
            "sliding_window": 64,
            "layer_types": ["sliding_attention", "full_attention"]
            * (text["num_hidden_layers"] // 2)
            + ["full_attention"] * (text["num_hidden_layers"] % 2),
            "max_position_embeddings": 4096,
            "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
        },
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": vision["hidden_size"],
            "intermediate_size": 2 * vision["hidden_size"],
            "num_hidden_layers": vision["layers"],
            "num_attention_heads": 4,
            "image_size": size,
            "patch_size": PATCH,
            "vision_use_head": False,
        },
        mm_tokens_per_image=side * side,
        boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"),
    )
    config.pad_token_id = tok.pad_token_id
    ip = Gemma3ImageProcessorPil(size={"height": size, "width": size})
    processor = Gemma3Processor(
        image_processor=ip, tokenizer=tok, chat_template=TEMPLATE, image_seq_length=side * side
    )
    return config, processor
