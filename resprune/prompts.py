"""Prompt hygiene: template a user question around one image without letting it inject tokens.

The user's question is tokenized on its own with ``split_special_tokens=True``, so literal
``<image>``, ``<|image_pad|>``, ``<|im_end|>`` or ``</s>`` in it stay plain text: they cannot
create image slots (which would fail the whole batch) or role breaks. The chat template is
rendered around a sentinel; the text before it goes through the processor (which expands the
image placeholder and makes pixel values), the text after it is tokenized with special tokens
recognised. Questions longer than ``max_question_tokens`` are cut *before* templating (cutting
the templated prompt breaks the image-token count). Non-goal: multi-image or multi-turn chats.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from resprune.items import ItemError, PreparedItem
from resprune.relevance import extract_content_words

TILES_FIRST = ("internvl",)  # families whose pixel_values are [tiles, 3, H, W], no batch dim
SENTINEL = "\u2063QUESTION\u2063"  # invisible separator: never produced by a template


@dataclass
class Prompt:
    """A templated prompt: token ids with the full image run, plus the processor's image inputs."""

    input_ids: np.ndarray  # int64 [L]
    image_inputs: dict[str, np.ndarray]  # pixel_values, image_sizes / image_grid_thw (one image)
    question: str  # the question as the model sees it (after truncation)
    truncated: bool


def question_ids(tokenizer, question: str, max_tokens: int) -> tuple[list[int], bool]:
    """Token ids of the question as plain text (no special tokens), cut to ``max_tokens``."""
    ids = tokenizer(question, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    # Defence in depth: a tokenizer that ignores split_special_tokens must still not inject.
    forbidden = set(tokenizer.all_special_ids) | _placeholder_ids(tokenizer)
    ids = [i for i in ids if i not in forbidden]
    return ids[:max_tokens], len(ids) > max_tokens


def build_prompt(
    processor,
    image: Image.Image,
    question: str,
    *,
    max_question_tokens: int,
    tiles_first: bool = False,
) -> Prompt:
    """Template ``question`` with one image; the question cannot add image slots or roles.

    ``tiles_first``: the processor's ``pixel_values`` have no batch dimension (InternVL's
    [tiles, 3, H, W]), so they are the image's as they are."""
    tokenizer = processor.tokenizer
    q_ids, truncated = question_ids(tokenizer, question, max_question_tokens)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": SENTINEL}]}
    ]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if rendered.count(SENTINEL) != 1:
        raise ValueError("the chat template must render the user text exactly once")
    prefix, suffix = rendered.split(SENTINEL)
    enc = processor(text=[prefix], images=[image], return_tensors="np")
    suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    ids = np.concatenate([enc["input_ids"][0], np.asarray(q_ids + suffix_ids, dtype=np.int64)])
    image_inputs = {
        key: enc[key] if key == "pixel_values" and tiles_first else _one_image(key, enc[key])
        for key in ("pixel_values", "image_sizes", "image_grid_thw")
        if key in enc
    }
    text = tokenizer.decode(q_ids) if truncated else question
    return Prompt(ids.astype(np.int64), image_inputs, text, truncated)


def _one_image(key: str, value: np.ndarray) -> np.ndarray:
    # Qwen's pixel_values are already flat patches [P, C*T*H*W]; the rest carry a batch dim.
    if key == "pixel_values" and value.ndim == 2:
        return value
    return value[0]


def _placeholder_ids(tokenizer) -> set[int]:
    names = ("image_token", "video_token", "vision_start_token", "vision_end_token")
    tokens = [getattr(tokenizer, name, None) for name in names]
    return {tokenizer.convert_tokens_to_ids(t) for t in tokens if isinstance(t, str)}


class Preprocessor:
    """Turns (image, question) into a `PreparedItem` with the processor only (no weights)."""

    def __init__(self, processor, family: str, *, context: int, max_question_tokens: int = 256):
        self.processor = processor
        self.family = family
        self.context = context
        self.max_question_tokens = max_question_tokens

    def prepare(self, image: Image.Image, question: str) -> PreparedItem:
        """Templated prompt, image inputs and relevance words; raises ItemError per item."""
        tokenizer = self.processor.tokenizer
        try:
            question_ids(tokenizer, question, self.max_question_tokens)
        except (TypeError, ValueError) as err:
            raise ItemError("bad_question", f"question cannot be tokenized: {err}") from err
        try:
            prompt = build_prompt(
                self.processor,
                image,
                question,
                max_question_tokens=self.max_question_tokens,
                tiles_first=self.family in TILES_FIRST,
            )
        except (TypeError, ValueError, OSError) as err:
            raise ItemError("bad_image", f"processor rejected the image: {err}") from err
        if len(prompt.input_ids) > self.context:
            raise ItemError(
                "prompt_too_long",
                f"prompt has {len(prompt.input_ids)} tokens > context {self.context}",
            )
        words, extractor = extract_content_words(prompt.question)
        return PreparedItem(
            input_ids=prompt.input_ids,
            pixel_values=prompt.image_inputs["pixel_values"],
            image_sizes=prompt.image_inputs.get("image_sizes"),
            image_grid_thw=prompt.image_inputs.get("image_grid_thw"),
            relevance_token_ids=[word_ids(tokenizer, w) for w in words],
            relevance_words=words,
            relevance_extractor=extractor,
            question=prompt.question,
            question_truncated=prompt.truncated,
        )


def word_ids(tokenizer, word: str) -> list[int]:
    """Token ids of ``word`` as it appears mid-sentence, without whitespace-only pieces."""
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    return [i for i in ids if tokenizer.decode([i]).strip()]
