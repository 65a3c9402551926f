"""`vqa_accuracy` against an independent port of the official VQA evaluation (`vqa_official`).

The contract: `vqa_accuracy(prediction, references)` equals the official accuracy of the
normalised prediction against the normalised references (answer structs as VQAv2 ships
them), on every case. Checked on 800 seeded stress cases (punctuation, numbers as words,
articles, contractions, case, whitespace, empty strings, unicode, ``\\r``, NBSP, long runs of
periods, blank references), directly and through the eval's own scoring path.
"""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from pipeline.eval import scoring
from pipeline.eval.scoring import normalize_answer, vqa_accuracy
from pipeline.eval.summary import score_rows
from tests import vqa_official as official

CASES = 800
BASES = [
    "yes",
    "no",
    "2",
    "two",
    "Two",
    "TEN",
    "none",
    "zero",
    "One dog",
    "1,000",
    "3.5",
    "3.",
    "the dog",
    "a red car",
    "An Apple",
    "the",
    "a",
    "dont",
    "don't",
    "im",
    "Im",
    "I'm",
    "ive",
    "lets",
    "let's",
    "shes",
    "she's",
    "somebodyd",
    "somebody'd",
    "whats up",
    "oclock",
    "left/right",
    "ten-year-old",
    "x - y",
    "(yes)",
    "yes!",
    "yes !",
    "...",
    "!!",
    "?",
    "e.g.",
    "U.S.A.",
    "3.14.",
    "1,2",
    "x@y",
    "a_b",
    "it's",
    "it 's",
    "red,blue",
    "red, blue",
    "50%",
    "café",
    "naïve",
    "İstanbul",
    "日本",
    "straße",
    "ﬁsh",
    "yes" + "." * 40,
    "yes" + "." * 70,
    "",
    " ",
    "\t",
    "\r",
    "\xa0",
    "yes\r",
    "no\xa0",
    "semi;colon",
    "back\\slash",
    'say "hi"',
    "[x]",
    "{y}",
    "a=b",
    "a+b",
    "<tag>",
    "`code`",
]
SPACES = ["", " ", "  ", "\t", "\n", "\r", "\xa0", "\r\n", " \xa0 "]
TAILS = ["", "", ".", "!", "?", ",", " .", "..", "'", ";"]


def _variant(rng: random.Random, text: str) -> str:
    """``text`` with random case, surrounding whitespace and a trailing mark."""
    case = rng.choice([str, str.lower, str.upper, str.title, str.capitalize])
    return rng.choice(SPACES) + case(text) + rng.choice(TAILS) + rng.choice(SPACES)


def stress_cases(n: int = CASES, seed: int = 20) -> list[tuple[str, list[str]]]:
    """(prediction, 10 references) pairs: unanimous, mixed, blank-padded and noisy sets."""
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        pool = rng.sample(BASES, rng.randint(1, 4))
        kind = rng.random()
        if kind < 0.2:  # all ten agree (the official then leaves them unprocessed)
            refs = [pool[0]] * 10
        elif kind < 0.35:  # a few answers padded with blanks
            refs = [rng.choice(pool) for _ in range(rng.randint(1, 9))]
            refs += [rng.choice(["", " ", "\t"]) for _ in range(10 - len(refs))]
        else:
            refs = [_variant(rng, rng.choice(pool)) if rng.random() < 0.5 else rng.choice(pool)]
            refs += [rng.choice(pool) for _ in range(9)]
        rng.shuffle(refs)
        source = rng.choice([*pool, *rng.sample(BASES, 2)])
        cases.append((_variant(rng, source) if rng.random() < 0.7 else source, refs))
    return cases


STRESS = stress_cases()


def test_the_tables_are_the_official_ones():
    assert scoring._CONTRACTIONS == official.CONTRACTIONS
    assert list(scoring._PUNCT) == official.PUNCT
    assert scoring._NUMBERS == official.MANUAL_MAP
    assert sorted(scoring._ARTICLES) == sorted(official.ARTICLES)


def test_normalisation_is_the_officials_on_every_string():
    texts = {t for pred, refs in STRESS for t in [pred, *refs]} | set(BASES)
    assert len(texts) > 500
    for text in texts:
        assert normalize_answer(text) == official.process_prediction(text), repr(text)


def test_vqa_accuracy_equals_the_official_after_normalisation_on_every_case():
    assert len(STRESS) >= 300
    for pred, refs in STRESS:
        want = official.after_normalisation(pred, refs)
        assert vqa_accuracy(pred, refs) == pytest.approx(want, abs=1e-12), (pred, refs)


def test_the_eval_scoring_path_with_vqav2_answer_structs_equals_the_official():
    struct = pa.struct(
        [("answer", pa.string()), ("answer_confidence", pa.string()), ("answer_id", pa.int64())]
    )
    table = pa.table(
        {
            "id": [str(i) for i in range(len(STRESS))],
            "status": ["ok"] * len(STRESS),
            "answer": [pred for pred, _ in STRESS],
            "answers": pa.array([official.structs(refs) for _, refs in STRESS], pa.list_(struct)),
        }
    )
    scored, problems = score_rows(table, "answers")
    assert problems == []
    got = scored.column("vqa_accuracy").to_pylist()
    want = [official.after_normalisation(pred, refs) for pred, refs in STRESS]
    assert got == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize(
    ("pred", "refs", "want"),
    [
        ("yes", ["yes"] * 3 + [" "] * 7, 0.9),  # blank references count in the leave-one-out
        ("...", [""] * 10, 1.0),  # normalises to empty, as do the references
        ("the", ["", "x"] * 5, 1.0),  # five matches
        ("im", ["i'm"] * 10, 0.0),  # "Im" is capitalised in the official table: no expansion
        ("dont", ["don't"] * 10, 1.0),
        ("yes" + "." * 70, ["yes"] * 10, 0.0),  # 32 periods go per pass, two passes: 6 stay
        ("yes" + "." * 40, ["yes"] * 10, 1.0),
        ("two", ["2"] * 3 + ["two dogs", "3"] + ["three"] * 5, 0.9),
        ("Three.", ["2"] * 3 + ["two dogs", "3"] + ["three"] * 5, 1.0),
        ("four", ["2"] * 3 + ["two dogs", "3"] + ["three"] * 5, 0.0),
    ],
)
def test_known_cases(pred, refs, want):
    assert official.after_normalisation(pred, refs) == pytest.approx(want)
    assert vqa_accuracy(pred, refs) == pytest.approx(want)


def test_one_reference_is_the_documented_exception():
    # the official leaves the only reference out and finds nothing to match: always 0
    assert official.accuracy("yes", official.structs(["yes"])) == 0.0
    assert vqa_accuracy("yes", ["yes"]) == pytest.approx(1 / 3)
    assert vqa_accuracy("no", ["yes"]) == 0.0


def test_the_deliberate_difference_from_the_raw_official():
    # unanimous references are compared unprocessed by the official: a raw "Two" never
    # matches the processed prediction "2"; normalised first, it does
    assert official.accuracy("two", official.structs(["Two"] * 10)) == 0.0
    assert vqa_accuracy("two", ["Two"] * 10) == 1.0
    raw = [official.accuracy(pred, official.structs(refs)) for pred, refs in STRESS]
    differ = [
        refs for (pred, refs), r in zip(STRESS, raw, strict=True) if vqa_accuracy(pred, refs) != r
    ]
    assert (len(differ), sum(len(set(r)) == 1 for r in differ)) == (223, 41)  # README quotes it
