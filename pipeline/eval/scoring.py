"""Answer scoring against reference answers: VQA accuracy, exact match, token F1.

`vqa_accuracy` is the official VQA evaluation (GT-Vision-Lab ``vqaEval.py``) applied after
answer normalisation, the way LLaVA-style VQAv2 numbers are produced: the prediction is
normalised (as a submission converter does) and the references alike, then the official
rule scores it. `normalize_answer` is the official processing, quirks included: only
``\\n`` and ``\\t`` become spaces before the punctuation rule (``\\r`` and NBSP do not), at
most 32 periods go per pass (the official passes ``re.UNICODE``, 32, as ``sub``'s count),
and the contraction table keeps its capitalised keys (``Im``, ``Ive``), which never match
after lower-casing. The official then processes the submitted answer once more, and the
references with the punctuation rule only, unless all of them agree; every reference counts
in the leave-one-out average, blank ones included. Non-goals: synonyms, answer types, the
official per-question-type breakdown.
"""

from __future__ import annotations

import re

from pipeline.report.overlap import overlap_f1

_PUNCT = tuple(';/[]"{}()=+\\_-><@`,?!')
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # as written there: a period not before a digit
_PERIODS_PER_PASS = 32  # the official's sub(..., re.UNICODE): the flag lands on count
_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")
_NUMBERS = dict(
    zip(
        "none zero one two three four five six seven eight nine ten".split(),
        "0 0 1 2 3 4 5 6 7 8 9 10".split(),
        strict=True,
    )
)
_ARTICLES = {"a", "an", "the"}
# The official table as it is, odd entries included: the capitalised keys (Id've, I'dve, Im,
# Ive) never match a lower-cased word, let's and she's map to themselves, somebody'd loses
# its apostrophe.
_CONTRACTIONS = dict(
    pair.split(":", 1)
    for pair in """
    aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've
    couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't
    hadnt've:hadn't've hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've
    he'dve:he'd've hes:he's howd:how'd howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm
    Ive:I've isnt:isn't itd:it'd itd've:it'd've it'dve:it'd've itll:it'll let's:let's
    maam:ma'am mightnt:mightn't mightnt've:mightn't've mightn'tve:mightn't've mightve:might've
    mustnt:mustn't mustve:must've neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't
    ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at shant:shan't shed've:she'd've
    she'dve:she'd've she's:she's shouldve:should've shouldnt:shouldn't shouldnt've:shouldn't've
    shouldn'tve:shouldn't've somebody'd:somebodyd somebodyd've:somebody'd've
    somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's someoned:someone'd
    someoned've:someone'd've someone'dve:someone'd've someonell:someone'll someones:someone's
    somethingd:something'd somethingd've:something'd've something'dve:something'd've
    somethingll:something'll thats:that's thered:there'd thered've:there'd've
    there'dve:there'd've therere:there're theres:there's theyd:they'd theyd've:they'd've
    they'dve:they'd've theyll:they'll theyre:they're theyve:they've twas:'twas wasnt:wasn't
    wed've:we'd've we'dve:we'd've weve:we've werent:weren't whatll:what'll whatre:what're
    whats:what's whatve:what've whens:when's whered:where'd wheres:where's whereve:where've
    whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll whos:who's whove:who've
    whyll:why'll whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't
    wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll
    yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've
    you'dve:you'd've youll:you'll youre:you're youve:you've""".split()
)


def _punctuation(text: str) -> str:
    """The official ``processPunctuation``: each mark is dropped where it touches a space (or
    anywhere once the text holds a digit-comma-digit), else it becomes a space; then periods
    not before a digit go, at most 32 of them."""
    out = text
    for p in _PUNCT:
        if p + " " in text or " " + p in text or _COMMA_NUMBER.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIODS_PER_PASS)


def _digits_articles(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, number words to digits, articles
    dropped, contractions given their apostrophe."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """The official VQA answer processing of a prediction (punctuation, numbers, articles,
    contractions), as a submission converter applies it."""
    text = str(text).replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(text))


def vqa_accuracy(prediction: str, references: list[str]) -> float:
    """The official VQA accuracy of the normalised prediction against the normalised references.

    Per left-out reference, min(#matching other references / 3, 1), averaged over all of them
    (10 references: one match scores 0.3, two 0.6, three 0.9, four or more 1.0). Blank
    references count. One reference (the official would always score 0: leaving it out leaves
    nothing to match) scores min(match / 3, 1).
    """
    if not references:
        raise ValueError("no reference answers")
    pred = normalize_answer(normalize_answer(prediction))  # the official processes it again
    refs = [normalize_answer(r) for r in references]
    if len(set(refs)) > 1:  # the official leaves unanimous references as they are
        refs = [_punctuation(r) for r in refs]
    hits = [r == pred for r in refs]
    if len(hits) == 1:
        return min(hits[0] / 3, 1.0)
    total = sum(hits)
    return sum(min((total - h) / 3, 1.0) for h in hits) / len(hits)


def exact_match(prediction: str, references: list[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference."""
    pred = normalize_answer(prediction)
    return float(any(normalize_answer(r) == pred for r in references))


def token_f1(prediction: str, references: list[str]) -> float:
    """Best bag-of-words F1 (SQuAD style) over the references, on normalised answers."""
    pred = normalize_answer(prediction).split()
    return max((overlap_f1(pred, normalize_answer(r).split()) for r in references), default=0.0)


METRICS = {"vqa_accuracy": vqa_accuracy, "exact_match": exact_match, "token_f1": token_f1}


def score(prediction: str, references: list[str]) -> dict[str, float]:
    """All metrics of one answer."""
    return {name: fn(prediction, references) for name, fn in METRICS.items()}
