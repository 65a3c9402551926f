"""Content words of a question: spaCy's nouns when installed, else a stopword filter.

spaCy is used when it and its English model ``en_core_web_sm`` import; otherwise a small
dependency-free extractor keeps the words that are neither stopwords nor prompt-template
words. The two can pick different words, so which one ran is recorded (run summary, output
rows, spec fingerprint). A question without content words (e.g. the default captioning
prompt "Describe this image in one sentence.") gives no words, and relevance is inert
(r = 1). No torch here: the spec's fingerprint imports it.
"""

from __future__ import annotations

import functools
import re

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


def active_extractor() -> str:
    """The extractor `extract_content_words` uses here: "spacy" or "stopwords"."""
    return "spacy" if _spacy_model() is not None else "stopwords"


@functools.cache
def _spacy_model():
    try:
        import spacy

        return spacy.load("en_core_web_sm", disable=["parser", "ner", "lemmatizer"])
    except (ImportError, OSError):
        return None
