"""The shadow sample in one model actor, on a deterministic clock: the report recovers a known
time ratio; a small night is measured; a twin is its pruned batch's items in one batch, its
pass order alternates; a failing twin (out of memory too) is recorded and changes nothing in
production.

The model call is a fake whose "device time" advances a fake clock by a known amount per
batch, so every number below is exact; the actor, its packing, its sample and the report are
the real ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import resprune.answer
from pipeline.output.columns import output_schema
from pipeline.report.api import build_report, write_report
from pipeline.report.load import load_output
from pipeline.spec import parse_spec
from pipeline.stages import timing
from pipeline.stages.answer import Answerer
from pipeline.stages.preprocess import Preprocess
from resprune.items import ItemError, ItemResult

PRUNED_S = (0.5, 1.0)  # per batch, per item: a batch of n pruned items takes 0.5 + 1.0 n s
UNPRUNED_S = (1.5, 3.0)  # three times as long, whatever the batch: the known ratio is 3


class FakeDevice:
    """A clock (``perf_counter``) that only the fake model call advances, and that call."""

    def __init__(self) -> None:
        self.now, self.calls = 0.0, []
        self.fail_unpruned: BaseException | None = None
        self.unpruned_error_for: str | None = None  # this item's unpruned answer fails alone
        self.pruned_oom_above: int | None = None  # pruned batches above this size run out

    def perf_counter(self) -> float:
        return self.now

    def answer_batch(self, vlm, items, *, pruner, keep, **kwargs):
        unpruned = pruner.name == "none"
        self.calls.append(("unpruned" if unpruned else "pruned", [it.item_id for it in items]))
        base, each = UNPRUNED_S if unpruned else PRUNED_S
        self.now += base + each * len(items)
        if unpruned and self.fail_unpruned is not None:
            raise self.fail_unpruned
        if not unpruned and len(items) > (self.pruned_oom_above or len(items)):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (pruned)")
        if unpruned and self.unpruned_error_for:
            return [
                ItemError("prompt_too_long", "too long unpruned")
                if it.item_id == self.unpruned_error_for
                else self._result(it, unpruned)
                for it in items
            ]
        return [self._result(it, unpruned) for it in items]

    @staticmethod
    def _result(it, unpruned: bool) -> ItemResult:
        return ItemResult(
            answer=f"{'u' if unpruned else 'p'} {it.item_id}",
            visual_tokens=576,
            kept_tokens=576 if unpruned else 64,
            kept_indices=[],
            retained_energy=1.0,
            prompt_tokens=len(it.input_ids) if unpruned else 84,
            prompt_tokens_unpruned=len(it.input_ids),
            new_tokens=4,
        )


@pytest.fixture
def device(monkeypatch: pytest.MonkeyPatch) -> FakeDevice:
    fake = FakeDevice()
    monkeypatch.setattr(timing, "time", fake)
    monkeypatch.setattr(resprune.answer, "answer_batch", fake.answer_batch)
    return fake


def _spec(model: Path, fraction: float, batch_size: int, **execution):
    return parse_spec(
        {
            "name": "t",
            "input": {"uri": "in/"},
            "output": {"uri": "out/"},
            "model": {"path": str(model), "max_new_tokens": 4},
            "pruning": {"keep": 64},
            "execution": {"gpus_per_actor": 0, "batch_size": batch_size, **execution},
            "cost": {"shadow_fraction": fraction, "gpu_type": "cpu"},
        }
    )


@pytest.fixture(scope="module")
def prepared_rows(tiny_llava: Path) -> pa.Table:
    """16 prepared rows (the bundled images, repeated under distinct ids)."""
    images = sorted(Path("pipeline/assets/images").glob("*.jpg"))
    rows = [
        {"id": f"i{k:02d}", "image": images[k % len(images)].read_bytes(), "question": "What?"}
        for k in range(16)
    ]
    return Preprocess(_spec(tiny_llava, 0.0, 4), [])(pa.Table.from_pylist(rows))


def _actor(model: Path, fraction: float, batch_size: int = 4, **execution) -> Answerer:
    spec = _spec(model, fraction, batch_size, **execution)
    return Answerer(spec, run_id="r1", run_date="2026-12-07", passthrough=pa.schema([]))


def _report(tmp_path: Path, rows: list[dict]) -> dict:
    """The cost report over these rows (one run, one result file)."""
    (tmp_path / "_runs").mkdir(parents=True)
    (tmp_path / "_manifest").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=output_schema()), tmp_path / "part-0.parquet")
    (tmp_path / "_manifest" / "part-0.parquet.done").write_text("{}")
    run = {"run_id": "r1", "run_date": "2026-12-07", "gpu_type": "cpu", "actor_seconds": 1e4}
    (tmp_path / "_runs" / "r1.json").write_text(json.dumps(run))
    return build_report(load_output(str(tmp_path)))


def _seconds(n: int, per: tuple[float, float]) -> float:
    return per[0] + per[1] * n


def test_the_report_recovers_a_known_ratio_on_a_deterministic_clock(
    tiny_llava, prepared_rows, device, tmp_path
) -> None:
    """Batches of 4 (and 1 in another call); every 2nd batch of a bucket shadowed: the
    report's unpruned hours are exactly what the unpruned passes would have taken."""
    actor = _actor(tiny_llava, 0.5)
    rows = actor(prepared_rows.slice(0, 12)).to_pylist()
    rows += actor(prepared_rows.slice(12, 1)).to_pylist()
    assert all(r["status"] == "ok" for r in rows)
    shadowed = {r["batch_id"] for r in rows if r["shadow"]}
    assert len({r["batch_id"] for r in rows}) == 4 and len(shadowed) == 3  # 1st, 3rd; the 1
    for r in rows:
        n = r["batch_size"]
        assert r["gpu_seconds"] == pytest.approx(_seconds(n, PRUNED_S) / n)
        if r["shadow"]:
            assert r["shadow_gpu_seconds"] == pytest.approx(_seconds(n, UNPRUNED_S) / n)
    report = _report(tmp_path, rows)
    truth = 3 * _seconds(4, UNPRUNED_S) + _seconds(1, UNPRUNED_S)  # every batch unpruned
    assert report["gpu_hours_used"] * 3600 == pytest.approx(3 * 4.5 + 1.5)
    assert report["gpu_hours_unpruned_est"] * 3600 == pytest.approx(truth)
    assert report["time_ratio"] == pytest.approx(3.0)
    assert report["shadow_batches"] == 3 and report["shadow_batches_failed"] == 0
    lo, hi = report["gpu_hours_unpruned_ci"]
    assert lo <= report["gpu_hours_unpruned_est"] <= hi


@pytest.mark.parametrize("fraction", [0.5, 0.01])
def test_a_small_night_gets_an_estimate(tiny_llava, prepared_rows, device, tmp_path, fraction):
    """4 batches of 4: fraction 0.5 shadows 2, fraction 0.01 still its first batch."""
    actor = _actor(tiny_llava, fraction)
    rows = actor(prepared_rows).to_pylist()
    shadowed = {r["batch_id"] for r in rows if r["shadow"]}
    assert len(shadowed) == (2 if fraction == 0.5 else 1)
    report = _report(tmp_path, rows)
    assert report["gpu_hours_unpruned_est"] * 3600 == pytest.approx(4 * _seconds(4, UNPRUNED_S))
    if fraction == 0.01:  # one batch: no interval, and the report says why
        assert report["gpu_hours_unpruned_ci"] is None and report["shadow_batches"] == 1
        write_report(str(tmp_path), formats=("md",))
        assert "n = 1 batch" in (tmp_path / "_report" / "report.md").read_text()
    else:  # two batches: a Student-t interval (1 d.o.f.), here of width 0 (equal batches)
        assert report["gpu_hours_unpruned_ci"] is not None


def test_twins_are_the_same_items_in_one_batch_and_the_pass_order_alternates(
    tiny_llava, prepared_rows, device
) -> None:
    actor = _actor(tiny_llava, 1.0, batch_size=8)
    rows = actor(prepared_rows).to_pylist()
    pruned = [ids for kind, ids in device.calls if kind == "pruned"]
    twins = [ids for kind, ids in device.calls if kind == "unpruned"]
    assert [len(b) for b in pruned] == [8, 8]
    assert [sorted(t) for t in twins] == [sorted(b) for b in pruned]  # same items, one batch
    kinds = [kind for kind, _ in device.calls]
    assert kinds == ["pruned", "unpruned", "unpruned", "pruned"]  # alternating order
    assert all(r["shadow"] and r["shadow_answer"] == f"u {r['id']}" for r in rows)


def test_a_twin_that_an_unpruned_job_could_not_batch_is_split_as_it_would_be(
    tiny_llava, prepared_rows, device
) -> None:
    """A token budget that holds 8 pruned items but 2 unpruned ones: the twin is the same 8
    items in the batches an unpruned job would run (the truth it estimates), never fewer."""
    actor = _actor(tiny_llava, 1.0, batch_size=8, max_batch_tokens=1400)
    rows = actor(prepared_rows.slice(0, 8)).to_pylist()
    pruned = [ids for kind, ids in device.calls if kind == "pruned"]
    twins = [ids for kind, ids in device.calls if kind == "unpruned"]
    assert [len(b) for b in pruned] == [8]
    assert sorted(i for t in twins for i in t) == sorted(pruned[0]) and len(twins) == 4
    assert all(r["shadow_answer"] and r["batch_size"] == 8 for r in rows)  # the pruned bucket


@pytest.mark.parametrize(
    "failure",
    [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to 2 GiB"), ValueError("mismatch")],
)
def test_a_failing_twin_is_recorded_and_production_is_untouched(
    tiny_llava, prepared_rows, device, tmp_path, failure
) -> None:
    """A twin that raises (out of memory too) is a failed shadow batch: the pruned answers
    stand, no SystemicFault, no error streak, production's budgets unchanged (an OOM shrinks
    the shadow's own packer)."""
    actor = _actor(tiny_llava, 1.0)
    device.fail_unpruned = failure
    rows = actor(prepared_rows.slice(0, 8)).to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * 8
    assert all(r["answer"] == f"p {r['id']}" and r["gpu_seconds"] > 0 for r in rows)
    assert all(r["shadow"] and r["shadow_answer"] is None for r in rows)
    assert all(type(failure).__name__ in r["shadow_error"] for r in rows)
    assert all(r["failed_gpu_seconds"] == 0.0 for r in rows)  # a twin's time is never "used"
    assert not any(actor.errors.recent)  # no model error in the window
    assert actor.packer.oom_tokens is None  # production's budgets as they were
    oom = isinstance(failure, torch.cuda.OutOfMemoryError)
    assert (actor.shadow_packer.oom_tokens is not None) == oom
    report = _report(tmp_path, rows)
    assert report["shadow_batches_failed"] == 2 and report["shadow_batches"] == 0
    assert report["gpu_hours_unpruned_est"] is None  # no pair measured, nothing invented
    if oom:  # the next twin is packed under the shadow's learned budget, production is not
        device.fail_unpruned = None
        device.calls.clear()
        actor(prepared_rows.slice(8, 4))
        sizes = {
            k: [len(ids) for kind, ids in device.calls if kind == k] for k in ("pruned", "unpruned")
        }
        assert sizes["pruned"] == [4] and sum(sizes["unpruned"]) == 4 and len(sizes["unpruned"]) > 1


def test_a_partial_twin_is_a_failed_shadow_batch(tiny_llava, prepared_rows, device) -> None:
    """One item fails unpruned only (its prompt is too long without pruning): the pair would
    be partial, so the whole twin is a failed shadow batch; the pruned answers stand."""
    actor = _actor(tiny_llava, 1.0)
    device.unpruned_error_for = "i01"
    rows = actor(prepared_rows.slice(0, 4)).to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * 4
    assert all("unpruned prompt_too_long" in r["shadow_error"] for r in rows)
    assert all(r["shadow_answer"] is None for r in rows)


def test_a_pruned_batch_split_by_an_oom_gets_no_twin(tiny_llava, prepared_rows, device) -> None:
    """Production's out-of-memory splits the pruned batch: no like-for-like twin exists, so
    none is run (the first draw is pruned first); the shadow's budgets stay as they were."""
    actor = _actor(tiny_llava, 1.0)
    device.pruned_oom_above = 2
    rows = actor(prepared_rows.slice(0, 4)).to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * 4 and not any(r["shadow"] for r in rows)
    kinds = [kind for kind, _ in device.calls]
    assert set(kinds) == {"pruned"} and len(kinds) > 2  # 4 (out of memory), then smaller
    assert actor.packer.oom_tokens is not None and actor.shadow_packer.oom_tokens is None
