"""The family registry: one list of families everywhere, and a checkpoint of any other family
refused in one line (exit 2) at validate and at planning, before any actor starts."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.__main__ import main as cli
from pipeline.job.checks import FAMILIES as SPEC_FAMILIES
from resprune.models import ADAPTERS, FAMILIES
from resprune.tiny import FAMILIES as TINY_FAMILIES


def test_every_family_has_an_adapter_a_spec_value_and_a_tiny_builder():
    from pipeline.cli.tiny import FAMILIES as CLI_FAMILIES

    assert set(FAMILIES) == set(SPEC_FAMILIES) == set(TINY_FAMILIES) == set(CLI_FAMILIES)
    assert all(ADAPTERS[f].family == f for f in FAMILIES)


def _job(tmp_path: Path, model_type: str | None, family: str = "auto") -> Path:
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": ["a"], "image": [b"x"]}), tmp_path / "in" / "p.parquet")
    (tmp_path / "m").mkdir()
    config = {"model_type": model_type} if model_type else {"architectures": ["X"]}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    doc = {
        "name": "t",
        "input": {"uri": str(tmp_path / "in")},
        "model": {"path": str(tmp_path / "m"), "family": family},
        "output": {"uri": str(tmp_path / "out")},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize(
    "command", [["validate"], ["validate", "--deep"], ["run", "--no-progress"]]
)
@pytest.mark.parametrize("model_type", ["mllama", None])
def test_unsupported_family_is_refused_in_one_line(tmp_path, capsys, command, model_type):
    job = _job(tmp_path, model_type)
    assert cli([command[0], str(job), *command[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model.path") and "\n" not in err
    assert f"unsupported model_type {model_type!r}" in err and "qwen3_vl" in err
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def test_family_other_than_the_checkpoints_is_refused(tmp_path, capsys):
    job = _job(tmp_path, "llava", family="qwen3_vl")
    assert cli(["validate", str(job)]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.family is 'qwen3_vl' but config.json's model_type is 'llava'" in err


def test_moe_flops_count_the_active_parameters(tmp_path):
    """Qwen3-VL-MoE: the shape the cost report reads has the MLP width one token runs
    through, so its FLOPs per token are those of the active parameters."""
    from pipeline.report.estimate import LlmShape
    from resprune.loading import load_vlm
    from resprune.tiny import build_tiny_checkpoint

    vlm = load_vlm(str(build_tiny_checkpoint("qwen3_vl_moe", tmp_path, text_intermediate=96)))
    text = vlm.model.config.text_config
    shape = vlm.describe()
    top_k, experts, width = text.num_experts_per_tok, text.num_experts, text.moe_intermediate_size
    assert (shape["experts"], shape["experts_per_token"]) == (experts, top_k) == (4, 2)
    assert shape["intermediate_size"] == top_k * width
    mlp = 3 * text.hidden_size * width  # gate, up, down of one expert
    dropped = (experts - top_k) * mlp * text.num_hidden_layers
    assert shape["text_active_parameters"] == shape["text_parameters"] - dropped
    h, layers = text.hidden_size, text.num_hidden_layers
    kv = h * text.num_key_value_heads / text.num_attention_heads
    want = 2.0 * layers * (2 * h * h + 2 * h * kv + 3 * h * top_k * width)
    assert LlmShape.from_dict(shape).linear_flops_per_token() == want


@pytest.mark.parametrize(
    ("family", "policy", "says"),
    [
        ("gemma3", "contiguous", "model.engine: vllm does not take gemma3"),
        ("internvl", "original", "vLLM takes contiguous"),
    ],
)
def test_vllm_for_what_it_cannot_take_is_refused_at_validate(
    tmp_path, capsys, family, policy, says
):
    job = _job(tmp_path, family)
    doc = yaml.safe_load(job.read_text())
    doc["model"]["engine"] = "vllm"
    doc["pruning"] = {"position_policy": policy}
    job.write_text(yaml.safe_dump(doc))
    assert cli(["validate", str(job)]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and "\n" not in err
