"""`pipeline eval`: scoring against hand-computed cases, and one tiny-model eval end to end."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pipeline.__main__ import main as cli
from pipeline.eval import render
from pipeline.eval.cli import _verdict
from pipeline.eval.evaluate import references_text
from pipeline.eval.scoring import exact_match, normalize_answer, token_f1, vqa_accuracy
from pipeline.eval.spec import check_references
from pipeline.eval.summary import PER_ITEM, score_rows, summarize
from pipeline.io.storage import StorageError
from pipeline.report.content import TINY
from pipeline.report.render import visible
from resprune.answer import answer_batch
from resprune.loading import load_preprocessor, load_vlm
from resprune.tiny import build_tiny_checkpoint

ASSETS = Path(__file__).resolve().parent.parent / "pipeline" / "assets" / "images"
PICTURES = ["astronaut.jpg", "astronaut.jpg", "coffee.jpg", "rocket.jpg"]  # VQA: 2 on one
QUESTION_IDS = [262148000, 262148001, 393225000, 393225001]  # the hub's int64 question ids
NEW = 3
ENERGY = {"energy": 0.9, "min": 4, "max": 64}  # an energy budget among the compared


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
        "What colour is the suit?",
        "<script>alert(1)</script> which drink?",  # drawn: escaped
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
    # VQAv2 as the hub ships it: int64 question ids, answers as {answer, confidence, id}
    # structs, the image its Image() struct
    text = datasets.Value("string")
    answer = {"answer": text, "answer_confidence": text, "answer_id": datasets.Value("int64")}
    features = datasets.Features(
        {
            "question_id": datasets.Value("int64"),
            "image": datasets.Image(),
            "question": text,
            "answers": [answer],
        }
    )
    columns = {
        "question_id": QUESTION_IDS,
        "image": [{"bytes": (ASSETS / p).read_bytes(), "path": None} for p in PICTURES],
        "question": questions,
        "answers": [
            [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(r)]
            for r in refs
        ],
    }
    ds = datasets.Dataset.from_dict(columns, features=features)
    ds.to_parquet(str(root / "in" / "part-0.parquet"))
    spec = {
        "name": "tiny-eval",
        "input": {"uri": str(root / "in"), "id_column": "question_id"},
        "model": {"path": str(model), "max_new_tokens": NEW, "max_question_tokens": 16},
        "pruning": {"method": "resprune", "keep": 16},
        "execution": {"batch_size": 4, "preprocess_batch_size": 4},
        "output": {"uri": str(root / "out")},
        "eval": {
            "compare": [{"method": "uniform", "keep": 16}, {"keep": ENERGY}],
            "overlay_items": 2,
        },
    }
    (root / "eval.yaml").write_text(yaml.safe_dump(spec))
    return {"root": root, "answers": answers, "refs": refs}


def _rescore(answer: str, refs: list[str]) -> float:
    """Independent VQA accuracy for verbatim references: leave-one-out of min(matches/3, 1)."""
    hits = [r.strip().lower() == answer.strip().lower() for r in refs]
    return sum(min((sum(hits) - h) / 3, 1) for h in hits) / len(hits)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(300)
def test_tiny_eval_numbers_match_its_predictions_and_the_gate_fails(labelled, capsys):
    root = labelled["root"]
    rc = cli(["eval", str(root / "eval.yaml"), "--fail-below", "1000"])
    err = capsys.readouterr().err
    assert rc == 1 and "gate FAILED" in err  # relative performance is never 1000x
    summary = json.loads((root / "out" / "eval.json").read_text())
    pred = pq.read_table(root / "out" / "predictions.parquet").to_pylist()
    energy = "resprune@energy0.9[4-64]"
    assert sorted(summary["configs"]) == ["none", "resprune@16", energy, "uniform@16"]
    assert len(pred) == 4 * 4 and summary["common_items"] == 4
    none = sorted((r for r in pred if r["config"] == "none"), key=lambda r: r["id"])
    assert [r["id"] for r in none] == [str(i) for i in QUESTION_IDS]  # decimal strings
    assert [r["answer"] for r in none] == labelled["answers"]  # the job path == answer_batch
    for label, c in summary["configs"].items():
        mine = [r for r in pred if r["config"] == label]
        want = [_rescore(r["answer"], [a["answer"] for a in r["answers"]]) for r in mine]
        assert [r["vqa_accuracy"] for r in mine] == pytest.approx(want)
        assert c["vqa_accuracy"] == pytest.approx(sum(want) / 4)
        assert c["kept_tokens_per_item"] == pytest.approx(sum(r["kept_tokens"] for r in mine) / 4)
        if label == energy:  # each item its own k, within [min, max]
            assert {r["keep"] for r in mine} == {"energy=0.9,min=4,max=64"}
            assert all(4 <= r["kept_tokens"] <= 64 for r in mine)
            continue
        assert c["kept_tokens_per_item"] == (576 if label == "none" else 16)
    ref = summary["configs"]["none"]["vqa_accuracy"]
    assert ref == pytest.approx((0.9 + 1.0 + 0.3 + 0.0) / 4)
    gated = summary["configs"]["resprune@16"]["vqa_accuracy"] / ref
    assert summary["gate"] == {"config": "resprune@16", "relative": pytest.approx(gated)}
    assert _verdict(summary, gated) == 0 and _verdict(summary, gated + 1e-6) == 1
    levels = summary["equal_tokens"]["levels"]  # fixed budgets compared at its mean kept tokens
    assert summary["configs"][energy]["kept_tokens_per_item"] in levels and 16.0 in levels
    page = (root / "out" / "eval.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "Content-Security-Policy" in page  # offline: nothing is fetched
    assert not re.search(r'(src|href)="(https?:)?//|url\((?!#)', page)
    assert page.count("data:image/jpeg;base64,") == 2 * 4  # 2 items x 4 overlays
    first, second, third = (f"{i}: " for i in QUESTION_IDS[:3])
    assert first in page and third in page and second not in page  # two different images
    shown = references_text([{"answer": a} for a in labelled["refs"][0]])
    assert shown.startswith("x (7), ") and shown.endswith(" (3)")
    assert html.escape(visible(f"References: {shown}")) in page  # each item's references
    assert html.escape(TINY) in page  # the checkpoint is a tiny random test model
    assert (root / "out" / "relative_vs_tokens.svg").read_text().lstrip().startswith("<?xml")


def test_missing_references_column_fails_before_any_model(labelled, capsys, tmp_path):
    spec = yaml.safe_load((labelled["root"] / "eval.yaml").read_text())
    spec["eval"]["references_column"] = "labels"
    spec["output"]["uri"] = str(tmp_path / "out")
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(spec))
    assert cli(["eval", str(tmp_path / "e.yaml")]) == 2
    assert "labels" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("typ", "ok"),
    [
        (pa.list_(pa.string()), True),
        (pa.large_list(pa.large_string()), True),
        (pa.list_(pa.struct([("answer", pa.string()), ("answer_id", pa.int64())])), True),
        (pa.struct([("answer", pa.list_(pa.string()))]), True),  # datasets' Sequence(dict)
        (pa.null(), True),
        (pa.string(), False),  # each character would be a reference
        (pa.list_(pa.int64()), False),
        (pa.list_(pa.struct([("text", pa.string())])), False),
    ],
)
def test_references_column_types(typ, ok):
    schema = pa.schema([("answers", typ)])
    if ok:
        check_references("in", schema, "answers")
        return
    with pytest.raises(StorageError) as err:
        check_references("in", schema, "answers")
    assert len(str(err.value).splitlines()) == 1
    assert f"eval.references_column 'answers' has type {typ}" in str(err.value)


def _eval_file(labelled, tmp_path: Path, **input_keys) -> Path:
    spec = yaml.safe_load((labelled["root"] / "eval.yaml").read_text())
    spec["input"] |= input_keys
    spec["output"]["uri"] = str(tmp_path / "out")
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path / "e.yaml"


def test_a_string_references_column_is_refused_before_any_write(labelled, capsys, tmp_path):
    table = pq.read_table(labelled["root"] / "in" / "part-0.parquet")
    flat = [" ".join(a["answer"] for a in r) for r in table.column("answers").to_pylist()]
    table = table.set_column(table.schema.get_field_index("answers"), "answers", pa.array(flat))
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in" / "part-0.parquet")
    path = _eval_file(labelled, tmp_path, uri=str(tmp_path / "in"))
    for args in (["validate", str(path)], ["validate", str(path), "--deep"], ["eval", str(path)]):
        assert cli(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "'answers' has type string" in err[0], err
    assert not (tmp_path / "out").exists()


def test_validate_takes_eval_files_and_writes_nothing(labelled, capsys, tmp_path):
    path = _eval_file(labelled, tmp_path)
    assert cli(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "input: parquet, 1 file(s)" in out and "(eval file, name=tiny-eval" in out
    assert cli(["validate", str(path), "--deep"]) == 0
    assert "storage ok: 4 of 4 items pending" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    assert cli(["validate", str(path), "--set", "eval.metric=bleu"]) == 2
    assert "eval.metric" in capsys.readouterr().err


def _rows(answers: dict[str, list[tuple[str, int]]], refs: list[str]) -> pa.Table:
    """Eval rows: per config, (answer, kept tokens) per item; every item has ``refs``."""
    rows = []
    for config, items in answers.items():
        method, _, keep = config.partition("@")
        for i, (answer, kept) in enumerate(items):
            rows.append(
                {
                    "id": f"q{i}",
                    "status": "ok",
                    "answer": answer,
                    "answers": refs,
                    "config": config,
                    "pruner": method,
                    "keep": keep,
                    **dict.fromkeys(PER_ITEM, 1),
                    "kept_tokens": kept,
                }
            )
    return pa.Table.from_pylist(rows)


def test_energy_budgets_are_compared_with_fixed_budgets_at_their_mean_kept_tokens():
    energy = "resprune@energy0.9[16-192]"
    answers = {
        "none": [("yes", 576), ("no", 576)],
        "resprune@64": [("yes", 64), ("x", 64)],
        "resprune@128": [("yes", 128), ("no", 128)],
        energy: [("yes", 40), ("no", 160)],
        "uniform@64": [("x", 64), ("x", 64)],
        "uniform@128": [("yes", 128), ("x", 128)],
    }
    table, _ = score_rows(_rows(answers, ["yes", "no"] * 5), "answers")
    series = {label: label.partition("@")[0] for label in answers} | {energy: energy}
    summary = summarize(table, list(answers), metric="exact_match", gated=energy, series=series)
    assert summary["configs"][energy]["kept_tokens_per_item"] == 100
    eq = summary["equal_tokens"]
    assert eq["levels"] == [100.0]  # the gated energy budget's mean
    assert eq["relative"][energy] == [1.0]
    assert eq["relative"]["resprune"] == [pytest.approx(0.5 + 0.5 * 36 / 64)]
    assert eq["relative"]["uniform"] == [pytest.approx(0.5 * 36 / 64)]
    gated = summarize(
        table, list(answers), metric="exact_match", gated="resprune@64", series=series
    )
    assert gated["equal_tokens"]["levels"] == [64.0, 100.0, 128.0]  # fixed levels + the energy one
    assert gated["equal_tokens"]["relative"][energy] == [None, 1.0, None]


def test_kept_tokens_are_averaged_over_the_scored_items():
    answers = {"none": [("yes", 576), ("no", 576)], "resprune@64": [("yes", 10), ("no", 90)]}
    table = _rows(answers, ["yes"] * 10).to_pylist()
    table[1]["status"] = "error"  # q1 failed under none: scored under no configuration
    scored, _ = score_rows(pa.Table.from_pylist(table), "answers")
    summary = summarize(scored, list(answers), metric="vqa_accuracy", gated="resprune@64")
    assert summary["common_items"] == 1
    assert summary["configs"]["resprune@64"]["kept_tokens_per_item"] == 10


def test_an_unknown_relative_score_is_explained_not_left_empty():
    answers = {"none": [("x", 576)], "resprune@64": [("yes", 64)]}
    scored, _ = score_rows(_rows(answers, ["yes"] * 10), "answers")
    summary = summarize(scored, list(answers), metric="vqa_accuracy", gated="resprune@64")
    page = render.blocks("e", "m", summary, [])
    notes = [b.text for b in page if b.kind == "note"]
    assert any("the unpruned reference (none) scored 0 vqa_accuracy" in n for n in notes)
    assert not any(b.text == "At equal kept tokens" for b in page)
    assert render.chart(summary, 0.95) is not None  # the scores themselves, not empty axes
    none_scored = _rows(answers, []).to_pylist()
    scored, problems = score_rows(pa.Table.from_pylist(none_scored), "answers")
    summary = summarize(scored, list(answers), metric="vqa_accuracy", gated="resprune@64")
    assert len(problems) == 1 and render.chart(summary, None) is None
    assert "nothing was scored" in render.why_unknown(summary)
