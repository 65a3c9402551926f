"""Test oracle: the accuracy of GT-Vision-Lab's official VQA evaluation (``vqaEval.py``).

An independent port of what ``VQAEval.evaluate`` does for one question, written for the
tests: the prediction's processing (newlines and tabs to spaces, strip, punctuation, digits
and articles, contractions), the references' (punctuation only, and only when they are not
all equal), and the leave-one-out over the answer *structs* (``item != left_out`` compares
whole dicts, so VQAv2's distinct ``answer_id`` makes it one struct at a time). Its tables
are the official ones, quirks included. It shares no code with `pipeline.eval.scoring`.
"""

from __future__ import annotations

import copy
import re

CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
MANUAL_MAP = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = ["a", "an", "the"]
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@"]
PUNCT += ["`", ",", "?", "!"]


def process_punctuation(in_text: str) -> str:
    out_text = in_text
    for p in PUNCT:
        if (p + " " in in_text or " " + p in in_text) or (
            re.search(COMMA_STRIP, in_text) is not None
        ):
            out_text = out_text.replace(p, "")
        else:
            out_text = out_text.replace(p, " ")
    # the original passes re.UNICODE positionally, where sub() takes its count
    return PERIOD_STRIP.sub("", out_text, count=re.UNICODE)


def process_digit_article(in_text: str) -> str:
    manual = dict(MANUAL_MAP)
    out_text = []
    for word in in_text.lower().split():
        word = manual.setdefault(word, word)
        if word not in ARTICLES:
            out_text.append(word)
    for word_id, word in enumerate(out_text):
        if word in CONTRACTIONS:
            out_text[word_id] = CONTRACTIONS[word]
    return " ".join(out_text)


def process_prediction(res_ans: str) -> str:
    """What ``evaluate`` does to a submitted answer (and what a submission converter does)."""
    res_ans = res_ans.replace("\n", " ")
    res_ans = res_ans.replace("\t", " ")
    res_ans = res_ans.strip()
    res_ans = process_punctuation(res_ans)
    return process_digit_article(res_ans)


def accuracy(res_answer: str, answers: list[dict]) -> float:
    """The official per-question accuracy of ``res_answer`` against VQA answer structs."""
    answers = copy.deepcopy(answers)  # the original rewrites them in place
    res_ans = process_prediction(res_answer)
    gt_acc = []
    gt_answers = [ans["answer"] for ans in answers]
    if len(set(gt_answers)) > 1:
        for ans_dic in answers:
            ans_dic["answer"] = process_punctuation(ans_dic["answer"])
    for gt_ans_datum in answers:
        other_gt_ans = [item for item in answers if item != gt_ans_datum]
        matching_ans = [item for item in other_gt_ans if item["answer"] == res_ans]
        acc = min(1, float(len(matching_ans)) / 3)
        gt_acc.append(acc)
    return float(sum(gt_acc)) / len(gt_acc)


def structs(texts: list[str]) -> list[dict]:
    """VQAv2-style answer structs (as the hub ships them: distinct answer ids)."""
    return [
        {"answer": t, "answer_confidence": "yes", "answer_id": i + 1} for i, t in enumerate(texts)
    ]


def after_normalisation(prediction: str, references: list[str]) -> float:
    """The official accuracy after the submission converter's normalisation, applied to the
    prediction and (as `pipeline eval` does) to the references."""
    normal = [process_prediction(r) for r in references]
    return accuracy(process_prediction(prediction), structs(normal))
