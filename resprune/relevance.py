"""Text relevance of visual tokens: content words of the question, embedded by the LLM.

``r_i = max_j cos(v_i, t_j)`` over the LLM input embeddings ``t_j`` of the question's
content words (max over words beat mean and pooled in the paper's ablation). Words come
from spaCy's noun tagger when spaCy and an English model are installed, else from a small
dependency-free extractor that drops stopwords and prompt-template words. This module
knows nothing about images or models beyond an embedding table.
"""

from __future__ import annotations

import functools
import re

import torch

WORD = re.compile(r"[A-Za-z][A-Za-z'-]*[A-Za-z]|[A-Za-z]")

STOPWORDS = frozenset(
    """a about above after again against all am an and any are aren't as at be because been
    before being below between both but by can could did do does doing don't down during each
    few for from further had has have having he her here hers herself him himself his how i if
    in into is isn't it it's its itself just let's me more most my myself no nor not now of off
    on once only or other our ours ourselves out over own same she should so some such than that
    the their theirs them themselves then there these they this those through to too under until
    up very was we were what when where which while who whom why will with would you your yours
    yourself yourselves there's what's who's where's how's many much""".split()
)

TEMPLATE_WORDS = frozenset(
    """describe description image picture photo photograph pic img shown show shows see seen
    visible depicted depict depicts sentence sentences word words phrase briefly brief detail
    detailed details short single one answer question please tell give provide write caption
    look looking appear appears kind type this that thing things""".split()
)


def extract_content_words(question: str) -> tuple[list[str], str]:
    """Content words of ``question`` (spaCy nouns, else non-stopwords) and the extractor used."""
    nlp = _spacy_model()
    if nlp is not None:
        words = [t.text.lower() for t in nlp(question) if t.pos_ in ("NOUN", "PROPN")]
        extractor = "spacy"
    else:
        words = [w.lower() for w in WORD.findall(question)]
        extractor = "stopwords"
    kept = [w for w in words if w not in STOPWORDS and w not in TEMPLATE_WORDS and len(w) > 1]
    return list(dict.fromkeys(kept)), extractor


@functools.cache
def _spacy_model():
    try:
        import spacy

        return spacy.load("en_core_web_sm", disable=["parser", "ner", "lemmatizer"])
    except (ImportError, OSError):
        return None


def token_relevance(tokens: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
    """``r_i = max_j cos(v_i, t_j)`` for tokens [N, D] and text [T, D]; ones when no text."""
    if text is None or text.numel() == 0:
        return torch.ones(tokens.shape[0], dtype=torch.float32, device=tokens.device)
    v = torch.nn.functional.normalize(tokens.float(), dim=-1)
    t = torch.nn.functional.normalize(text.float().to(tokens.device), dim=-1)
    return (v @ t.T).max(dim=-1).values
