"""The run's own rules for surviving faults of the job, without Ray: the error window, the
ledger's judgement of lost nodes and its bound on systemic exits, a vLLM engine refusing every
request, host memory, the layout sized from nodes that answer, and the newcomer refusals (a
named question column that is not there, an output prefix inside the input)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
import yaml

from pipeline import faults
from pipeline.__main__ import main as cli
from pipeline.io.inputs import check_columns
from pipeline.io.storage import StorageError
from pipeline.job import blocked, ledger
from pipeline.job.checks import check_output_outside_input
from pipeline.spec import ExecutionSpec, ProcessorConfig, parse_spec
from pipeline.stages import capacity, processor
from pipeline.stages.failures import WINDOW_ERRORS, WINDOW_ITEMS, ErrorWindow
from resprune.engines.base import EngineDead, Plan
from resprune.items import ItemError


def _spec(**parts) -> object:
    doc = {"name": "t", "input": {"uri": "in"}, "model": {"path": "org/m"}}
    return parse_spec(doc | {"output": {"uri": "out"}} | parts)


def test_the_error_window_catches_a_fault_that_hits_a_subset_of_items() -> None:
    """One item in four fails between good batches: the old streak never tripped; the window
    does once WINDOW_ERRORS of its recent items failed, and a few scattered errors never do."""
    err = ItemError("model_error", "RuntimeError: shape of this image size")
    window, seen = ErrorWindow(), 0
    with pytest.raises(faults.SystemicFault, match=f"failed {WINDOW_ERRORS} of the last"):
        for _ in range(100):
            window.observe(["ok", "ok", "ok", err])
            seen += 1
    assert seen == WINDOW_ERRORS - 1  # the WINDOW_ERRORS-th failing batch tripped it
    sparse = ErrorWindow()
    for _ in range(5 * WINDOW_ITEMS):  # 1 in 20: slides out before reaching the bound
        sparse.observe(["ok"] * 19 + [err])
    other = ErrorWindow()
    for _ in range(20):  # the input's own causes are the items', never the model's
        other.observe([ItemError("prompt_too_long", "long"), "ok"])


def test_a_batch_whose_every_item_the_model_failed_is_systemic() -> None:
    refused = ItemError("model_error", "vLLM refused the request: plugin mismatch")
    with pytest.raises(faults.SystemicFault, match="every item of a batch of 3"):
        ErrorWindow().observe([refused] * 3)
    ErrorWindow().observe([refused])  # one item alone stays its own error
    ErrorWindow().observe([refused, ItemError("prompt_too_long", "x")])


def test_host_memory_is_out_of_memory_never_the_items_fault() -> None:
    """The model stage splits a batch, then restarts its actor (test_pipeline_faults); the
    CPU stage defers the row for the rerun instead of committing it as the item's error."""
    from pipeline.stages.preprocess import _unexpected

    assert faults.is_oom(MemoryError())
    assert faults.classify(MemoryError(), batch_size=1) == faults.SYSTEMIC
    row: dict = {"id": "a", "status": "ok"}
    _unexpected(row, MemoryError())
    assert row["status"] == faults.DEFERRED
    _unexpected(row, ValueError("bad"))
    assert (row["status"], row["error_cause"]) == ("error", "preprocess_error")


def test_the_ledger_blames_no_item_for_a_lost_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """An attempt that died on a node the cluster lost is answered again whole and its lone
    item is no poison suspect; one that died on a live node is (one item at a time)."""
    alive = {"gpu-2"}
    monkeypatch.setattr(ledger, "alive_nodes", lambda: set(alive))
    book = ledger.Ledger.__ray_metadata__.modified_class()
    assert book.begin_batch(["a", "b"], "gpu-1") == (False, [])
    book.begin_solo("a", "gpu-1")  # gpu-1 is lost while "a" is answered alone
    assert book.begin_batch(["a", "b"], "gpu-2") == (False, [])  # whole again, nobody blamed
    assert book.lost_batches == 1
    book.begin_solo("a", "gpu-2")  # now the process dies on a live node, "a" alone
    assert book.begin_batch(["a", "b"], "gpu-2") == (True, ["a"])
    book.end(["a", "b"])
    assert book.begin_batch(["a", "b"], "gpu-2") == (False, [])
    assert book.progress() == (5, 2, 0)  # 4 batches begun, 1 ended; a and b in flight


def test_the_ledger_bounds_systemic_exits_per_run() -> None:
    book = ledger.Ledger.__ray_metadata__.modified_class(max_systemic=2)
    assert book.systemic_exit(["a"], "CUDA error") is None
    assert book.systemic_exit(["a"], "CUDA error") is None
    line = book.systemic_exit(["a"], "CUDA error: device-side assert")
    assert line.startswith("systemic fault, the model actor hit it 3 time(s)")
    assert "execution.max_task_retries=2" in line and "device-side assert" in line


class _RefusingLLM:
    """vLLM's ``LLM`` as a plugin mismatch leaves it: every enqueue raises."""

    model_config = SimpleNamespace(max_model_len=4096)

    def enqueue(self, request, params, use_tqdm=False):
        raise ValueError("the model's multimodal processor does not accept image_embeds")

    def wait_for_completion(self, use_tqdm=False):
        raise AssertionError("nothing was queued")


def _vllm_engine(monkeypatch: pytest.MonkeyPatch):
    from resprune.engines.vllm_engine import VllmEngine

    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(SamplingParams=lambda **k: k))
    engine = VllmEngine.__new__(VllmEngine)
    engine.llm, engine.dead, engine.qwen, engine.image_token_id = _RefusingLLM(), None, False, 9
    return engine


def _plan(n: int = 6) -> Plan:
    ids = torch.arange(n)
    return Plan(ids, torch.zeros(1, 4), ids[None], ids)


def test_vllm_refusing_every_request_of_a_batch_is_a_dead_engine(monkeypatch) -> None:
    """A refusal of every request of a batch is the engine's fault (EngineDead: the actor
    restarts, no row is written); a lone refusal stays the item's model_error."""
    engine = _vllm_engine(monkeypatch)
    (alone,) = engine.generate([_plan()], 4)
    assert isinstance(alone, ItemError) and alone.cause == "model_error"
    assert engine.dead is None
    with pytest.raises(EngineDead, match="refused every request of a batch of 3"):
        engine.generate([_plan(), _plan(), _plan()], 4)
    assert faults.classify(EngineDead(engine.dead), batch_size=3) == faults.SYSTEMIC
    with pytest.raises(EngineDead):  # and it stays dead for this process
        engine.generate([_plan()], 4)


@pytest.mark.parametrize(
    ("inp", "out", "refused"),
    [
        ("data/in", "data/in", True),
        ("data/in/", "data/in/results", True),
        ("s3://b/in/", "s3://b/in/dt=1/out/", True),
        ("s3://b/in/*.parquet", "s3://b/in/out", True),
        ("s3://b/in/", "s3://b/inbox/out", False),
        ("s3://b/in/", "s3://b/out/", False),
        ("data/in", "s3://b/data/in", False),
    ],
)
def test_an_output_prefix_inside_the_input_is_refused(
    inp: str, out: str, refused: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    spec = _spec(input={"uri": inp}, output={"uri": out})
    if not refused:
        check_output_outside_input(spec)
        return
    with pytest.raises(StorageError, match=r"is inside input\.uri"):
        check_output_outside_input(spec)


def _input(tmp_path: Path) -> Path:
    (tmp_path / "in").mkdir()
    rows = [{"id": "a", "image": b"x", "prompt": "What?"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in" / "part.parquet")
    return tmp_path / "in"


def test_newcomer_refusals_exit_2_in_one_line_before_any_write(tmp_path: Path, capsys) -> None:
    """A named question column the input lacks, and an output inside the input: exit 2, one
    line, nothing written (no lease, no output folder)."""
    inp = _input(tmp_path)
    base = {"name": "t", "input": {"uri": str(inp)}, "model": {"path": "org/m"}}
    cases = {
        "typo.yaml": base
        | {"input": {"uri": str(inp), "question_column": "qestion"}}
        | {"output": {"uri": str(tmp_path / "out")}},
        "inside.yaml": base | {"output": {"uri": str(inp / "results")}},
    }
    for name, doc in cases.items():
        job = tmp_path / name
        job.write_text(yaml.safe_dump(doc))
        assert cli(["run", str(job), "--no-progress", "--run-date", "2026-11-24"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
        assert ("'qestion' is not a column" in err[0]) == (name == "typo.yaml")
    assert not (tmp_path / "out").exists() and not (inp / "results").exists()
    assert sorted(p.name for p in inp.iterdir()) == ["part.parquet"]


def test_an_unnamed_question_column_may_be_absent(tmp_path: Path) -> None:
    schema = pq.read_schema(_input(tmp_path) / "part.parquet")
    check_columns("p", schema.remove(schema.get_field_index("prompt")), _spec().input)
    check_columns("p", schema, _spec(input={"uri": "in", "question_column": "prompt"}).input)
    with pytest.raises(StorageError, match="'question' is not a column"):
        check_columns("p", schema, _spec(input={"uri": "in", "question_column": "question"}).input)


def test_layout_problem_names_what_the_live_nodes_lack() -> None:
    ex = ExecutionSpec(gpus_per_actor=1, cpus_per_actor=1)
    assert blocked.layout_problem(ex, {"CPU": 3.0, "GPU": 1.0}) is None
    line = blocked.layout_problem(ex, {"CPU": 2.0})
    assert line.startswith("the live nodes have 2 CPU, 0 GPU; this run's layout needs 3 CPU, 1 GPU")
    assert blocked.needs(ExecutionSpec(gpus_per_actor=0, cpus_per_actor=0)) == (
        "no reserved resources"
    )


def _node(port: int, cpus: float, gpus: float = 0.0, alive: bool = True) -> dict:
    res = {"CPU": cpus} | ({"GPU": gpus} if gpus else {})
    return {
        "Alive": alive,
        "NodeManagerAddress": "127.0.0.1",
        "NodeManagerPort": port,
        "Resources": res,
    }


def test_live_resources_leave_out_a_node_the_gcs_still_lists_but_that_does_not_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A GPU node killed seconds ago is still Alive in the GCS (until its health checks
    fail); a layout sized from it reserves CPUs that are gone and a rerun stalls."""
    with socket.socket() as listening, socket.socket() as closed:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        closed.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        up, down = listening.getsockname()[1], closed.getsockname()[1]
        nodes = [_node(up, 1), _node(down, 1, gpus=1), _node(up, 8, gpus=8, alive=False)]
        monkeypatch.setattr(ray, "nodes", lambda: nodes)
        assert capacity.live_resources() == {"CPU": 1.0}
        nodes[0]["NodeManagerPort"] = down  # no raylet answers: the GCS's view, not nothing
        assert capacity.live_resources() == {"CPU": 2.0, "GPU": 1.0}


def test_a_default_layout_reserves_no_model_cpu_on_a_cluster_short_of_cpus(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One live CPU (the GPU node lost, its replacement still coming): the model actor must
    not take the CPU the read task needs once the replacement joins; the run warns."""
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(processor, "live_resources", lambda: {"CPU": 1.0})
    cfg = ProcessorConfig.model_validate({"model": {"path": "m"}})
    quiet = processor.fit_to_cluster(cfg, quiet=True)  # the watch's look: said only once
    assert quiet.execution.cpus_per_actor == 0 and "may stall" not in caplog.text
    assert processor.fit_to_cluster(cfg).execution.cpus_per_actor == 0
    assert caplog.text.count("may stall until the cluster grows") == 1
    explicit = {"model": {"path": "m"}, "execution": {"cpus_per_actor": 1}}
    assert (
        processor.fit_to_cluster(ProcessorConfig.model_validate(explicit)).execution.cpus_per_actor
        == 1
    )
    monkeypatch.setattr(processor, "live_resources", lambda: {"CPU": 3.0})
    assert processor.fit_to_cluster(cfg).execution.cpus_per_actor == 1  # fits: kept


class _Scripted:
    """A ledger question whose answers come as scripted: (answer, when it was asked)."""

    def __init__(self, method: object) -> None:
        self.script: list[tuple[tuple[int, int, int], float]] = []
        self.asked = 0.0

    def answer(self, default: object) -> object:
        if not self.script:
            return default
        value, self.asked = self.script.pop(0)
        return value


def test_a_lost_node_is_waited_out_by_moves_after_it_not_by_answers_already_on_their_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The GPU node is lost at t=20: an answer asked at t=18 that carries a batch begun
    before the loss must not end the wait (the run would then wait for the stall timeout);
    with no move counted after the loss the run ends in NodeLost at startup_timeout_s, and a
    move after it (an actor placed on a replacement) ends the wait."""
    from pipeline.job import watchdog

    nodes = {"head": "10.0.0.1 (node head, 3 CPU)", "gpu": "10.0.0.2 (node gpu, 1 GPU)"}
    monkeypatch.setattr(blocked, "live_nodes", lambda: dict(nodes))
    monkeypatch.setattr(blocked, "blocked_line", lambda *a, **k: "blocked")
    monkeypatch.setattr(watchdog, "_Ask", _Scripted)
    monkeypatch.setattr(watchdog, "_interrupt", lambda thread: None)
    said: list[str] = []
    monkeypatch.setattr(watchdog.Watchdog, "say", lambda self, line: said.append(line))
    ex = ExecutionSpec(startup_timeout_s=45, stall_timeout_s=1800)
    fake = SimpleNamespace(progress=None, snapshot=None, placed=None)
    for recovers in (False, True):
        watch = watchdog.Watchdog(ex, fake, on_gone=lambda *a: None)
        moving = watchdog._Moving(watch)
        moving.restart(0.0)
        moving.progress.script = [((5, 2, 1), 9.0)]
        assert moving.check(10.0)
        del nodes["gpu"]
        moving.progress.script = [((6, 2, 1), 18.0), ((6, 2, 1), 21.0), ((6, 2, 1), 28.0)]
        assert moving.check(20.0) and watch.lost is not None  # the loss, and a stale answer
        assert moving.check(22.0) and moving.check(30.0) and watch.lost is not None
        if recovers:
            moving.progress.script = [((7, 2, 1), 31.0)]  # the actor placed on a replacement
            assert moving.check(32.0) and watch.lost is None
            assert moving.check(66.0) and watch.failure is None  # the stall clock runs again
        else:
            assert not moving.check(66.0)
            assert isinstance(watch.failure, watchdog.NodeLost)
            assert str(watch.failure).startswith("lost node 10.0.0.2 (node gpu, 1 GPU) and no ")
        assert said[0].startswith("run: lost node 10.0.0.2 (node gpu, 1 GPU) mid-run; ")
        nodes["gpu"], said[:] = "10.0.0.2 (node gpu, 1 GPU)", []


INTERRUPTED = """
import signal, threading, time
from pipeline.job import watchdog
signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell's `&`, nohup or a scheduler leave it
main = threading.main_thread()
threading.Timer(0.3, watchdog._interrupt, args=(main,)).start()
deadline = time.monotonic() + 20
try:
    while time.monotonic() < deadline:  # Ray Data's wait for the next output block
        time.sleep(0.01)
except KeyboardInterrupt:
    print("interrupted")
"""


def test_the_watchdog_ends_a_run_whose_process_ignores_sigint() -> None:
    """A run started in the background (SIGINT ignored) still ends at its startup, stall or
    node-loss timeout: the interrupt is not a simulated SIGINT, which such a process drops."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-c", INTERRUPTED], capture_output=True, text=True, timeout=60
    )
    assert proc.stdout.strip() == "interrupted", proc.stderr[-2000:]
