"""The fault taxonomy: classification, bounded retries, and the documented error-cause enum."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline import faults
from pipeline.faults import ITEM, ITEM_CAUSES, SYSTEMIC, TRANSIENT, classify
from pipeline.output.summary import Recorder
from pipeline.spec import parse_spec
from resprune.engines import EngineDead

ROOT = Path(__file__).resolve().parent.parent


class OutOfMemoryError(RuntimeError):
    """Named like torch.OutOfMemoryError (classified by name: no CUDA build needed)."""


class EngineDeadError(RuntimeError):
    """Named like vLLM's EngineDeadError (classified by name: no vLLM needed)."""


def _chained(cause: BaseException) -> BaseException:
    """A ValueError raised while handling ``cause`` (the engine's death deeper in the chain)."""
    try:
        try:
            raise cause
        except BaseException as inner:
            raise ValueError("wrapped") from inner
    except ValueError as outer:
        return outer


@pytest.mark.parametrize(
    ("exc", "batch", "kind"),
    [
        (
            OSError("AWS Error SLOW_DOWN during GetObject operation: Please reduce your rate"),
            1,
            TRANSIENT,
        ),
        (OSError("AWS Error UNKNOWN (HTTP status 503) during HeadObject operation"), 1, TRANSIENT),
        (
            OSError("AWS Error NETWORK_CONNECTION: curlCode: 56, Connection reset by peer"),
            1,
            TRANSIENT,
        ),
        (ConnectionResetError(104, "Connection reset by peer"), 1, TRANSIENT),
        (TimeoutError("timed out"), 1, TRANSIENT),
        (OSError("Path does not exist 'bucket/x.jpg'"), 1, ITEM),
        (OSError("AWS Error ACCESS_DENIED during GetObject operation"), 1, ITEM),
        (RuntimeError("CUDA error: device-side assert triggered"), 4, SYSTEMIC),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), 1, SYSTEMIC),
        (OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), 1, SYSTEMIC),
        (OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), 8, ITEM),
        (MemoryError(), 1, SYSTEMIC),  # the host ran out: the job's sizing, never the item's
        (MemoryError("std::bad_alloc"), 8, ITEM),  # a batch of several is split instead
        (ValueError("shapes do not match"), 1, ITEM),
        (EngineDead("the vLLM engine failed: KeyError: 'x'"), 8, SYSTEMIC),
        (_chained(EngineDeadError("EngineCore encountered an issue")), 1, SYSTEMIC),
    ],
)
def test_classify(exc: BaseException, batch: int, kind: str) -> None:
    assert classify(exc, batch_size=batch) == kind


def test_retry_is_bounded_and_only_for_transient_faults() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise OSError("AWS Error SLOW_DOWN")
        return "ok"

    assert faults.retry(flaky, what="x", base_s=0.001) == "ok" and len(calls) == 3

    def reset() -> None:
        calls.append(1)
        raise ConnectionResetError(104, "Connection reset by peer")

    calls.clear()
    with pytest.raises(faults.TransientFault, match="still failing after 4 attempts"):
        faults.retry(reset, what="x", attempts=4, base_s=0.001)
    assert len(calls) == 4

    def missing() -> None:
        calls.append(1)
        raise FileNotFoundError("no such key")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        faults.retry(missing, what="x", base_s=0.001)
    assert len(calls) == 1


def _emitted_causes() -> set[str]:
    """Every literal cause the code can write: ItemError("...") and error_cause="..."."""
    pattern = re.compile(r'ItemError\(\s*"(\w+)"|error_cause="(\w+)"')
    found = set()
    for path in [*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("resprune/**/*.py")]:
        for match in pattern.finditer(path.read_text()):
            found.add(match.group(1) or match.group(2))
    return found


def _documented(path: Path, heading: str) -> list[str]:
    text = path.read_text()
    section = text[text.index(heading) :].split("\n#", 1)[0]
    return re.findall(r"^\| `(\w+)` \|", section, flags=re.M)


def test_error_causes_emitted_equal_the_documented_enum() -> None:
    assert _emitted_causes() == set(ITEM_CAUSES)
    assert _documented(ROOT / "schemas" / "output_columns.md", "## Error causes") == list(
        ITEM_CAUSES
    )
    assert _documented(ROOT / "docs" / "reliability.md", "## Error causes") == list(ITEM_CAUSES)


@pytest.mark.parametrize(
    ("rows", "errors", "pending", "status", "why"),
    [
        (100, 5, 100, "finished", None),
        (100, 6, 100, "failed", "error fraction 0.060 > execution.max_error_fraction 0.05"),
        (10, 9, 10, "finished", None),  # too few items to judge
        (99, 0, 100, "failed", "1 item(s) left unanswered"),
    ],
)
def test_run_status_judges_the_error_fraction_once_enough_items_are_done(
    rows: int, errors: int, pending: int, status: str, why: str | None
) -> None:
    spec = parse_spec(
        {"name": "t", "input": {"uri": "in"}, "model": {"path": "org/m"}, "output": {"uri": "out"}}
    )
    plan = SimpleNamespace(items_pending=pending, bad_shards={})
    recorder = Recorder(spec, plan, run_id="r", run_date="2026-11-24", started=0.0)
    got, reason = recorder._status({"rows": rows, "items_error": errors}, None)
    assert got == status and (reason or "").startswith(why or "")
    assert (reason is None) == (why is None)


def test_the_model_stage_turns_systemic_faults_into_an_actor_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CUDA error, out of memory (device or host) with one item, or the model raising for
    WINDOW_ERRORS of its recent items raise SystemicFault (the actor then exits) instead of
    becoming error rows."""
    import pyarrow as pa

    import resprune.answer
    from pipeline.stages.answer import WINDOW_ERRORS, Answerer
    from pipeline.stages.failures import ErrorWindow
    from resprune.loading import load_preprocessor
    from resprune.tiny import build_tiny_checkpoint
    from tests.vlm_helpers import prepared

    model = build_tiny_checkpoint("llava", tmp_path / "model")
    spec = parse_spec(
        {
            "name": "t",
            "input": {"uri": "in"},
            "output": {"uri": "out"},
            "model": {"path": str(model)},
            "execution": {"gpus_per_actor": 0},
        }
    )
    answerer = Answerer(spec, run_id="r", run_date="2026-11-24", passthrough=pa.schema([]))
    raised: list[BaseException] = []

    def fails(vlm, items, **kwargs):
        raise raised[0]

    monkeypatch.setattr(resprune.answer, "answer_batch", fails)
    items, keep = [object()] * 4, spec.pruning.keep
    pre = load_preprocessor(str(model))
    real = prepared(pre, 3) + prepared(pre, 1)
    cases = [
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB"),  # smaller, then alone
        MemoryError(),  # the host's allocator: the same, never the item's fault
    ]
    for exc in cases:
        raised[:] = [exc]
        with pytest.raises(faults.SystemicFault, match=type(exc).__name__):
            answerer._run(real, answerer.pruner, keep)
    raised[:] = [ValueError("shape mismatch")]
    answerer.errors = ErrorWindow()
    out = answerer._run(items, answerer.pruner, keep)  # item faults, below the window's bound
    assert [a.result.cause for a in out] == ["model_error"] * 4
    with pytest.raises(faults.SystemicFault, match=f"failed {WINDOW_ERRORS} of the last"):
        answerer._run([object()] * 4, answerer.pruner, keep)
