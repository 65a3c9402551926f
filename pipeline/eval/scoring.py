"""Answer scoring against reference answers: VQA accuracy, exact match, token F1.

Normalisation follows the official VQA evaluation (VQA v2 ``vqaEval.py``): punctuation is
removed (or turned into a space between words), a period is kept only before a digit,
number words become digits, articles are dropped and common contractions get their
apostrophe. Predictions and references are normalised alike. Non-goals: synonyms, answer
types, the official per-question-type breakdown.
"""

from __future__ import annotations

import re

from pipeline.overlap import overlap_f1

_PUNCT = tuple(';/[]"{}()=+\\_-><@`,?!')
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # as in the official code: a period not before a digit
_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")
_NUMBERS = dict(
    zip(
        "none zero one two three four five six seven eight nine ten".split(),
        "0 0 1 2 3 4 5 6 7 8 9 10".split(),
        strict=True,
    )
)
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = dict(
    pair.split(":")
    for pair in """aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't
    couldn'tve:couldn't've couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't
    hadnt:hadn't hadnt've:hadn't've hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd
    hed've:he'd've he'dve:he'd've hes:he's howd:how'd howll:how'll hows:how's id've:i'd've
    i'dve:i'd've im:i'm ive:i've isnt:isn't itd:it'd itd've:it'd've it'dve:it'd've itll:it'll
    lets:let's maam:ma'am mightnt:mightn't mightnt've:mightn't've mightn'tve:mightn't've
    mightve:might've mustnt:mustn't mustve:must've neednt:needn't notve:not've oclock:o'clock
    oughtnt:oughtn't shant:shan't shed've:she'd've she'dve:she'd've shes:she's
    shouldve:should've shouldnt:shouldn't shouldnt've:shouldn't've shouldn'tve:shouldn't've
    somebodyd:somebody'd somebodyd've:somebody'd've somebody'dve:somebody'd've
    somebodyll:somebody'll somebodys:somebody's someoned:someone'd someoned've:someone'd've
    someone'dve:someone'd've someonell:someone'll someones:someone's somethingd:something'd
    somethingd've:something'd've something'dve:something'd've somethingll:something'll
    thats:that's thered:there'd thered've:there'd've there'dve:there'd've therere:there're
    theres:there's theyd:they'd theyd've:they'd've they'dve:they'd've theyll:they'll
    theyre:they're theyve:they've twas:'twas wasnt:wasn't wed've:we'd've we'dve:we'd've
    weve:we've werent:weren't whatll:what'll whatre:what're whats:what's whatve:what've
    whens:when's whered:where'd wheres:where's whereve:where've whod:who'd whod've:who'd've
    who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll whyre:why're whys:why's
    wont:won't wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've wouldn'tve:wouldn't've
    yall:y'all yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've y'alld've:y'all'd've
    y'all'dve:y'all'd've youd:you'd youd've:you'd've you'dve:you'd've youll:you'll
    youre:you're youve:you've""".split()
)


def normalize_answer(text: str) -> str:
    """The official VQA answer normalisation (punctuation, numbers, articles, contractions)."""
    text = " ".join(str(text).replace("\n", " ").replace("\t", " ").split())
    out = text
    for p in _PUNCT:
        if p + " " in text or " " + p in text or _COMMA_NUMBER.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, references: list[str]) -> float:
    """min(#matching references / 3, 1), averaged over the leave-one-out reference subsets.

    That average is what the official evaluation computes for its 10 references (one match
    scores 0.3, two 0.6, three 0.9, four or more 1.0); with a single reference it is just
    min(matches / 3, 1).
    """
    if not references:
        raise ValueError("no reference answers")
    pred = normalize_answer(prediction)
    hits = [normalize_answer(r) == pred for r in references]
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
