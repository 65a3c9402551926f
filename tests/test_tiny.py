"""The tiny checkpoint builder: hub layout, sizes as parameters, realistic chat templates."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from resprune.loading import load_preprocessor, load_vlm
from resprune.tiny import build_tiny_checkpoint

TEMPLATE_MARKS = {
    "llava": ("USER: <image>\n", " ASSISTANT:"),
    "llava_next": ("USER: <image>\n", " ASSISTANT:"),
    "qwen2_5_vl": ("<|im_start|>user\n<|vision_start|>", "<|im_end|>\n<|im_start|>assistant\n"),
    "qwen3_vl": ("<|im_start|>user\n<|vision_start|>", "<|im_end|>\n<|im_start|>assistant\n"),
    "qwen3_vl_moe": ("<|im_start|>user\n<|vision_start|>", "<|im_end|>\n<|im_start|>assistant\n"),
    "gemma3": (
        "<bos><start_of_turn>user\n<start_of_image>",
        "<end_of_turn>\n<start_of_turn>model\n",
    ),
    "internvl": ("<|im_start|>user\n<IMG_CONTEXT>\n", "<|im_end|>\n<|im_start|>assistant\n"),
}


@pytest.mark.parametrize("family", list(TEMPLATE_MARKS))
def test_builds_a_loadable_hub_layout_folder(family, tmp_path):
    path = build_tiny_checkpoint(
        family,
        tmp_path / family,
        text_hidden=32,
        text_layers=1,
        heads=2,
        kv_heads=1,
        image_size=112,
    )
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    assert json.loads((path / "config.json").read_text())["model_type"] == family
    shape = load_vlm(str(path)).describe()
    assert (shape["hidden_size"], shape["num_layers"], shape["num_heads"]) == (32, 1, 2)
    assert shape["num_kv_heads"] == 1 and shape["vocab"] < 1000
    processor = load_preprocessor(str(path)).processor
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    head, tail = TEMPLATE_MARKS[family]
    assert head in text and text.endswith(tail) and "Hi?" in text


def test_same_seed_same_weights_other_seed_differs(tmp_path):
    a = load_file(build_tiny_checkpoint("llava", tmp_path / "a", seed=1) / "model.safetensors")
    b = load_file(build_tiny_checkpoint("llava", tmp_path / "b", seed=1) / "model.safetensors")
    c = load_file(build_tiny_checkpoint("llava", tmp_path / "c", seed=2) / "model.safetensors")
    assert a.keys() == b.keys() == c.keys()
    assert all(a[k].equal(b[k]) for k in a)
    assert not all(a[k].equal(c[k]) for k in a)


def test_unknown_family_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown family"):
        build_tiny_checkpoint("blip2", tmp_path)
