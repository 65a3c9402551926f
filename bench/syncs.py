"""Host synchronisations per item around `answer_batch`, per family (CPU proxy, issue 18).

Counts, with `tests/syncs.py`, the ops that would stall a CUDA stream in one `answer_batch`
at batch 1 and batch 8 (tiny models of `resprune/tiny.py`, resprune keep 16, after a warm
call; transformers' decode loop not counted): "all" counts them on every tensor, host ones
included; "device" only on tensors that would be on the GPU. Then every pruner (LLaVA,
"device"): the baselines read the device once per call, as ResPrune does. Prints one JSON
line.
Run: python bench/syncs.py
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, bench/ is sys.path[0] and bench/select.py would shadow the stdlib `select`.
here = Path(__file__).parent.resolve()
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
sys.path.insert(0, str(here.parent))

import json  # noqa: E402
import tempfile  # noqa: E402

from resprune.answer import answer_batch  # noqa: E402
from resprune.loading import load_preprocessor, load_vlm  # noqa: E402
from resprune.pruners import PRUNERS, build_pruner  # noqa: E402
from resprune.tiny import FAMILIES, build_tiny_checkpoint  # noqa: E402
from tests.syncs import count_answer_batch_syncs  # noqa: E402
from tests.vlm_helpers import QUESTIONS, images  # noqa: E402


def count(vlm, items, everything: bool, method: str = "resprune"):
    kwargs = {"pruner": build_pruner(method), "keep": 16, "max_new_tokens": 3}
    answer_batch(vlm, items, **kwargs)  # warm
    return count_answer_batch_syncs(vlm, items, everything=everything, **kwargs)


def main() -> None:
    out = {}
    for family in FAMILIES:
        path = build_tiny_checkpoint(family, tempfile.mkdtemp())
        vlm, pre = load_vlm(str(path)), load_preprocessor(str(path))
        pictures = images()
        items = [pre.prepare(pictures[i % 3], QUESTIONS[i % 3]) for i in range(8)]
        for mode in ("all", "device"):
            one, eight = (count(vlm, items[:n], mode == "all") for n in (1, 8))
            row = {
                "b1": one.total,
                "b8": eight.total,
                "per_item_b8": eight.total / 8,
                "slope": (eight.total - one.total) / 7,
                "b8_ops": dict(eight.syncs),
                "to_device_b1_b8": [one.to_device, eight.to_device],
            }
            out[f"{family}/{mode}"] = row
            print(f"{family:11s} {mode:6s} {row}", flush=True)
        if family == "llava":
            for method in PRUNERS:
                one, eight = (count(vlm, items[:n], False, method) for n in (1, 8))
                row = {"b1": one.total, "b8": eight.total, "b8_ops": dict(eight.syncs)}
                out[f"llava/pruner={method}"] = row
                print(f"llava       {method:10s} {row}", flush=True)
    print(json.dumps({"bench": "syncs", "results": out}))


if __name__ == "__main__":
    main()
