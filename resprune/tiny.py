"""Tiny random-weight checkpoints of each supported family, written offline in the hub layout.

The folder holds config.json (marked ``"resprune_tiny_random": true``, which ``VLM.describe``
reports so run summaries and cost reports can say so), model.safetensors, a byte-level BPE
tokenizer trained on a small corpus, the PIL image processor, and a realistic chat template
(LLaVA-1.5 "USER: <image>\\n... ASSISTANT:"; Qwen im_start/im_end). Sizes are parameters, so
the benchmark can build a larger, LLM-dominated model with the same code. Non-goal:
meaningful outputs (weights are random).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import processors
from transformers import (
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen3VLConfig,
    Qwen3VLMoeConfig,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from resprune import tiny_gemma3, tiny_internvl
from resprune.models.qwen_processor import IMAGE_ONLY
from resprune.tiny_bpe import train_bpe

LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
QWEN = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
FAMILIES = ("llava", "llava_next", *QWEN, "gemma3", "internvl")
OWN_BUILDERS = {"gemma3": tiny_gemma3, "internvl": tiny_internvl}  # family -> its module


def build_tiny_checkpoint(
    family: str,
    out_dir: str | Path,
    *,
    text_hidden: int = 64,
    text_layers: int = 2,
    text_intermediate: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    image_size: int = 336,
    seed: int = 0,
) -> Path:
    """Write a random-weight checkpoint of ``family`` in the hub layout and return its folder."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    qwen = family in QWEN
    if family in OWN_BUILDERS:
        tokenizer = OWN_BUILDERS[family].tokenizer()
    else:
        tokenizer = _tokenizer(QWEN_SPECIALS if qwen else LLAVA_SPECIALS, qwen=qwen)
    text = {
        "hidden_size": text_hidden,
        "num_hidden_layers": text_layers,
        "intermediate_size": text_intermediate,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": len(tokenizer),
    }
    vision = {"hidden_size": vision_hidden, "layers": vision_layers, "image_size": image_size}
    if qwen:
        config, processor = _qwen(family, tokenizer, text, vision)
    elif family in OWN_BUILDERS:
        builder = OWN_BUILDERS[family]
        config, processor = builder.config_and_processor(tokenizer, text, vision)
    else:
        config, processor = _llava(family, tokenizer, text, vision)
    config.resprune_tiny_random = True  # read back by VLM.describe()
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    if family in ("llava", "llava_next"):
        _save_vision_keys_like_llava_hub(out)
    if qwen:
        _save_like_qwen_hub(processor, out)
    else:
        processor.save_pretrained(out)
    if family == "internvl":
        _name_stock_processor(out, "InternVLProcessor")
        tiny_internvl.save_video_config(out, vision["image_size"])
    return out


def _name_stock_processor(out: Path, name: str) -> None:
    """processor_config.json names the stock class, as the hub repos do (ours is a subclass
    that AutoProcessor would not find)."""
    path = out / "processor_config.json"
    data = json.loads(path.read_text())
    data["processor_class"] = name
    path.write_text(json.dumps(data, indent=2))


def _tokenizer(specials: list[str], *, qwen: bool) -> PreTrainedTokenizerFast:
    tok = train_bpe(specials, unk=None if qwen else "<unk>")
    if qwen:
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        )
    # Llama-style tokenizers prepend BOS; mirror that so templated prompts look real.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )


def _llava(family: str, tokenizer, text: dict, vision: dict):
    size = vision["image_size"]
    vision_config = CLIPVisionConfig(
        hidden_size=vision["hidden_size"],
        intermediate_size=2 * vision["hidden_size"],
        num_hidden_layers=vision["layers"],
        num_attention_heads=4,
        image_size=size,
        patch_size=14,
    )
    common = {
        "vision_config": vision_config,
        "text_config": LlamaConfig(**text, max_position_embeddings=4096),
        "image_token_id": tokenizer.image_token_id,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "pad_token_id": tokenizer.pad_token_id,
    }
    crop = {"height": size, "width": size}
    proc_kwargs = {
        "tokenizer": tokenizer,
        "patch_size": 14,
        "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1,
        "chat_template": LLAVA_TEMPLATE,
    }
    if family == "llava":
        ip = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size=crop)
        return LlavaConfig(**common), LlavaProcessor(image_processor=ip, **proc_kwargs)
    pinpoints = [[size, 2 * size], [2 * size, size], [2 * size, 2 * size]]
    ip = LlavaNextImageProcessorPil(
        size={"shortest_edge": size}, crop_size=crop, image_grid_pinpoints=pinpoints
    )
    config = LlavaNextConfig(**common, image_grid_pinpoints=pinpoints)
    return config, LlavaNextProcessor(image_processor=ip, **proc_kwargs)


def _qwen(family: str, tokenizer, text: dict, vision: dict):
    """Qwen2.5-VL (14 px patches, windowed attention) or Qwen3-VL (16 px patches, a learned
    position table, DeepStack from the first vision layers; MoE: experts in every LLM MLP)."""
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    half = head_dim // 2
    section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    ids = tokenizer.convert_tokens_to_ids
    text_config = {
        **text,
        "max_position_embeddings": 4096,
        "bos_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "rope_parameters": {"rope_type": "default", "mrope_section": section},
    }
    vision_config = {
        "depth": vision["layers"],
        "hidden_size": vision["hidden_size"],
        "intermediate_size": 2 * vision["hidden_size"],
        "num_heads": 4,
        "out_hidden_size": text["hidden_size"],
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    v3 = family != "qwen2_5_vl"
    patch = 16 if v3 else 14
    if v3:
        text_config["head_dim"] = head_dim
        text_config["rope_parameters"]["mrope_interleaved"] = True
        # DeepStack from the first vision layers, into the first LLM layers
        levels = min(vision["layers"], text["num_hidden_layers"])
        vision_config |= {"deepstack_visual_indexes": list(range(levels))}
        vision_config |= {"num_position_embeddings": 64, "patch_size": patch}
    else:
        vision_config |= {"patch_size": patch, "window_size": 112}
        vision_config["fullatt_block_indexes"] = [vision["layers"] - 1]
    if family == "qwen3_vl_moe":
        moe = {"num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 1}
        text_config |= moe | {"moe_intermediate_size": text["intermediate_size"] // 2}
    config_class = {
        "qwen2_5_vl": Qwen2_5_VLConfig,
        "qwen3_vl": Qwen3VLConfig,
        "qwen3_vl_moe": Qwen3VLMoeConfig,
    }[family]
    config = config_class(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    config.pad_token_id = tokenizer.pad_token_id
    size = vision["image_size"]
    ip = Qwen2VLImageProcessorPil(
        min_pixels=4 * patch * patch,
        max_pixels=size * size,
        patch_size=patch,
        merge_size=2,
        temporal_patch_size=2,
    )
    image_only = IMAGE_ONLY["qwen2_5_vl" if family == "qwen2_5_vl" else "qwen3_vl"]
    processor = image_only(image_processor=ip, tokenizer=tokenizer, chat_template=QWEN_TEMPLATE)
    return config, processor


def _save_vision_keys_like_llava_hub(out: Path) -> None:
    """Rename ``vision_tower.*`` to the llava-hf repos' ``vision_tower.vision_model.*``.

    transformers saves the CLIP tower without its ``vision_model`` level and loads both
    layouts; vLLM's loader knows only the hub's.
    """
    path = out / "model.safetensors"
    tensors = load_file(path)
    renamed = {
        re.sub(r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model.", key): value
        for key, value in tensors.items()
    }
    save_file(renamed, path, metadata={"format": "pt"})


def _save_like_qwen_hub(processor, out: Path) -> None:
    """Save as the Qwen/Qwen2.5-VL-* and Qwen3-VL-* repos are laid out: no
    processor_config.json."""
    processor.image_processor.save_pretrained(out)
    processor.tokenizer.save_pretrained(out)
    (out / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_TEMPLATE}))
    path = out / "preprocessor_config.json"
    data = json.loads(path.read_text())
    data["processor_class"] = type(processor).__mro__[1].__name__  # the stock class
    path.write_text(json.dumps(data, indent=2))
