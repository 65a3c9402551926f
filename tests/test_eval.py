"""`pipeline eval`: scoring against hand-computed cases, and one tiny-model eval end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pipeline.__main__ import main as cli
from pipeline.eval.cli import _verdict
from pipeline.eval.scoring import exact_match, normalize_answer, token_f1, vqa_accuracy
from resprune.answer import answer_batch
from resprune.loading import load_preprocessor, load_vlm
from resprune.tiny import build_tiny_checkpoint

ASSETS = Path(__file__).resolve().parent.parent / "pipeline" / "assets" / "images"
PICTURES = ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg"]
NEW = 3


NORMALISED = [
    ("Two dogs.", "2 dogs"),
    ("The cat's toy!", "cat's toy"),
    ("left/right", "left right"),
    ("dont know, maybe", "don't know maybe"),
    ("3.5 m", "3.5 m"),
    ("1,000", "1000"),
    ("Yes ", "yes"),
    ("an  apple\n", "apple"),
    ("ten-year-old", "10 year old"),
]


@pytest.mark.parametrize(("raw", "normal"), NORMALISED)
def test_vqa_normalisation(raw, normal):
    assert normalize_answer(raw) == normal


def test_vqa_accuracy_with_ten_references():
    refs = ["2"] * 3 + ["two dogs", "3"] + ["three"] * 5
    # prediction "two": 3 matches among 10; leave-one-out: 3 subsets keep 2 matches (2/3),
    # 7 keep 3 (1.0): (3 * 2/3 + 7 * 1) / 10 = 0.9
    assert vqa_accuracy("two", refs) == pytest.approx(0.9)
    assert vqa_accuracy("Three.", refs) == pytest.approx(1.0)  # 6 matches ("3" and 5 "three")
    assert vqa_accuracy("2 dogs", refs) == pytest.approx(0.3)  # 1 match: 9 subsets of 1/3
    assert vqa_accuracy("four", refs) == 0.0
    assert vqa_accuracy("yes", ["yes"]) == pytest.approx(1 / 3)  # one reference: min(1/3, 1)


def test_exact_match_and_token_f1():
    assert exact_match("A red car.", ["red car", "blue"]) == 1.0
    assert exact_match("red cars", ["red car"]) == 0.0
    # "red car parked" vs "the red truck": common {red}: p = 1/3, r = 1/2, F1 = 0.4
    assert token_f1("red car parked", ["the red truck", "green"]) == pytest.approx(0.4)
    assert token_f1("", ["x"]) == 0.0


# ---- one tiny eval, end to end through the CLI (real Ray in-process)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> dict:
    """A tiny LLaVA, a labelled Parquet set of bundled images whose references are built from
    the model's own unpruned answers (computed here without the pipeline), and an eval file."""
    root = tmp_path_factory.mktemp("eval")
    model = build_tiny_checkpoint("llava", root / "model")
    vlm, pre = load_vlm(str(model)), load_preprocessor(str(model), max_question_tokens=16)
    questions = [
        "What is in the picture?",
        "<script>alert(1)</script> which animal?",
        "What colour is the cup?",
        "Where is the rocket?",
    ]
    items = [
        pre.prepare(Image.open(ASSETS / p).convert("RGB"), q)
        for p, q in zip(PICTURES, questions, strict=True)
    ]
    answers = [
        r.answer for r in answer_batch(vlm, items, pruner=None, keep=1.0, max_new_tokens=NEW)
    ]
    refs = [[answers[0]] * 3 + ["x"] * 7, [answers[1]] * 10, [answers[2]] + ["y"] * 9, ["zz"] * 10]
    # exported with `datasets` as the README shows: the image is its Image() struct
    text = datasets.Value("string")
    features = datasets.Features(
        {"id": text, "image": datasets.Image(), "question": text, "answers": [text]}
    )
    columns = {
        "id": [f"item-{i}" for i in range(len(PICTURES))],
        "image": [{"bytes": (ASSETS / p).read_bytes(), "path": None} for p in PICTURES],
        "question": questions,
        "answers": refs,
    }
    ds = datasets.Dataset.from_dict(columns, features=features)
    ds.to_parquet(str(root / "in" / "part-0.parquet"))
    spec = {
        "name": "tiny-eval",
        "input": {"uri": str(root / "in")},
        "model": {"path": str(model), "max_new_tokens": NEW, "max_question_tokens": 16},
        "pruning": {"method": "resprune", "keep": 16},
        "execution": {"batch_size": 4, "preprocess_batch_size": 4},
        "output": {"uri": str(root / "out")},
        "eval": {"compare": [{"method": "uniform", "keep": 16}], "overlay_items": 2},
    }
    (root / "eval.yaml").write_text(yaml.safe_dump(spec))
    return {"root": root, "answers": answers, "refs": refs}


def _rescore(answer: str, refs: list[str]) -> float:
    """Independent VQA accuracy for verbatim references: leave-one-out of min(matches/3, 1)."""
    hits = [r.strip().lower() == answer.strip().lower() for r in refs]
    return sum(min((sum(hits) - h) / 3, 1) for h in hits) / len(hits)


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(300)
def test_tiny_eval_numbers_match_its_predictions_and_the_gate_fails(labelled, capsys):
    root = labelled["root"]
    rc = cli(["eval", str(root / "eval.yaml"), "--fail-below", "1000"])
    err = capsys.readouterr().err
    assert rc == 1 and "gate FAILED" in err  # relative performance is never 1000x
    summary = json.loads((root / "out" / "eval.json").read_text())
    pred = pq.read_table(root / "out" / "predictions.parquet").to_pylist()
    assert sorted(summary["configs"]) == ["none", "resprune@16", "uniform@16"]
    assert len(pred) == 4 * 3 and summary["common_items"] == 4
    none = sorted((r for r in pred if r["config"] == "none"), key=lambda r: r["id"])
    assert [r["answer"] for r in none] == labelled["answers"]  # the job path == answer_batch
    for label, c in summary["configs"].items():
        mine = [r for r in pred if r["config"] == label]
        want = [_rescore(r["answer"], r["answers"]) for r in mine]
        assert [r["vqa_accuracy"] for r in mine] == pytest.approx(want)
        assert c["vqa_accuracy"] == pytest.approx(sum(want) / 4)
        assert c["kept_tokens_per_item"] == pytest.approx(sum(r["kept_tokens"] for r in mine) / 4)
        assert c["kept_tokens_per_item"] == (576 if label == "none" else 16)
    ref = summary["configs"]["none"]["vqa_accuracy"]
    assert ref == pytest.approx((0.9 + 1.0 + 0.3 + 0.0) / 4)
    gated = summary["configs"]["resprune@16"]["vqa_accuracy"] / ref
    assert summary["gate"] == {"config": "resprune@16", "relative": pytest.approx(gated)}
    assert _verdict(summary, gated) == 0 and _verdict(summary, gated + 1e-6) == 1
    page = (root / "out" / "eval.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "Content-Security-Policy" in page  # offline: nothing is fetched
    assert not re.search(r'(src|href)="(https?:)?//|url\((?!#)', page)
    assert page.count("data:image/jpeg;base64,") == 2 * 3  # 2 items x 3 overlays
    assert (root / "out" / "relative_vs_tokens.svg").read_text().lstrip().startswith("<?xml")


def test_missing_references_column_fails_before_any_model(labelled, capsys, tmp_path):
    spec = yaml.safe_load((labelled["root"] / "eval.yaml").read_text())
    spec["eval"]["references_column"] = "labels"
    spec["output"]["uri"] = str(tmp_path / "out")
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(spec))
    assert cli(["eval", str(tmp_path / "e.yaml")]) == 2
    assert "labels" in capsys.readouterr().err
