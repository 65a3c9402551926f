"""The byte-level BPE tokenizer of the tiny checkpoints (`resprune.tiny`), trained offline on a
small corpus with each family's special tokens."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CORPUS = [
    "USER: What is in this image? ASSISTANT: A cat sits on a red mat near the window.",
    "Describe this image in one sentence. A rocket launches into a blue sky.",
    "How many people are in the photo? Two astronauts stand next to a coffee cup.",
    "What color is the car on the left side of the street? The car is green.",
    "system You are a helpful assistant. user assistant",
]


def train_bpe(specials: list[str], *, unk: str | None = None) -> Tokenizer:
    """A 400-token byte-level BPE over the corpus, ``specials`` first (ids 0, 1, ...)."""
    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok
