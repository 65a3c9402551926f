"""The README's offline eval example: a labelled canary from the bundled images, then its eval.

    .venv/bin/python examples/eval_canary.py [OUT]        # default OUT: demo-output/eval
    .venv/bin/pipeline eval demo-output/eval/eval.yaml --fail-below 0.95

Labels each bundled image once with the unpruned tiny model (``answer_batch`` with
``pruner=None``; references = 10 copies of its answer, so scores are agreement with unpruned),
writes ``OUT/canary.parquet`` and ``OUT/eval.yaml`` (the nightly's model and pruning, the
canary as input, the default comparison). The model is `resprune.tiny`'s random-weight LLaVA.
"""

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image

from resprune.answer import answer_batch
from resprune.loading import load_preprocessor, load_vlm
from resprune.tiny import build_tiny_checkpoint

IMAGES = Path(__file__).resolve().parent.parent / "pipeline" / "assets" / "images"
QUESTION = "What is in this picture?"


def main(out: Path) -> Path:
    model = out / "model"
    out.mkdir(parents=True, exist_ok=True)
    if not (model / "config.json").is_file():
        build_tiny_checkpoint("llava", model)
    vlm, pre = load_vlm(str(model)), load_preprocessor(str(model))
    paths = sorted(p for p in IMAGES.iterdir() if p.suffix in (".jpg", ".png"))
    items = [pre.prepare(Image.open(p).convert("RGB"), QUESTION) for p in paths]
    results = answer_batch(vlm, items, pruner=None, keep=1.0, max_new_tokens=4)
    rows = [
        {"id": p.stem, "image": p.read_bytes(), "question": QUESTION, "references": [r.answer] * 10}
        for p, r in zip(paths, results, strict=True)
    ]
    pq.write_table(pa.Table.from_pylist(rows), out / "canary.parquet")
    spec = {
        "name": "canary-eval",
        "input": {"uri": str(out / "canary.parquet")},
        "model": {"path": str(model), "max_new_tokens": 4},
        "pruning": {"method": "resprune", "keep": 64},
        "execution": {"gpus_per_actor": 0},
        "output": {"uri": str(out / "out")},
        "eval": {"references_column": "references"},
    }
    (out / "eval.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return out / "eval.yaml"


if __name__ == "__main__":
    print(f"wrote {main(Path(sys.argv[1] if len(sys.argv) > 1 else 'demo-output/eval'))}")
