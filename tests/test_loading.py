"""Loading from a folder and from a real S3 server; clear errors; safetensors and remote code."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoProcessor

from resprune.items import ItemError
from resprune.loading import (
    ModelNotFoundError,
    UnsupportedModelError,
    load_preprocessor,
    load_vlm,
)
from resprune.tiny import build_tiny_checkpoint
from tests.vlm_helpers import images


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return build_tiny_checkpoint("qwen2_5_vl", tmp_path_factory.mktemp("qwen"))


def upload(client, folder, bucket: str, prefix: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder)}")


def test_load_from_s3_downloads_once_and_refreshes_on_change(
    qwen_dir, s3_server, s3_bucket, tmp_path
):
    client = s3_server.client()
    upload(client, qwen_dir, s3_bucket, "models/tiny-qwen")
    uri = f"s3://{s3_bucket}/models/tiny-qwen/"
    vlm = load_vlm(uri, cache_dir=str(tmp_path))
    assert vlm.family == "qwen2_5_vl" and vlm.describe()["hidden_size"] == 64
    (entry,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    weights = entry / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    pre = load_preprocessor(uri, cache_dir=str(tmp_path))  # reuses the cache
    assert weights.stat().st_mtime_ns == stamp
    assert pre.prepare(images()[0], "What is the cat doing?").image_grid_thw is not None
    config = json.loads((qwen_dir / "generation_config.json").read_text())
    config["max_new_tokens"] = 7
    client.put_object(
        Bucket=s3_bucket,
        Key="models/tiny-qwen/generation_config.json",
        Body=json.dumps(config).encode(),
    )
    load_vlm(uri, cache_dir=str(tmp_path))  # the ETag changed: fetched again
    assert json.loads((entry / "generation_config.json").read_text())["max_new_tokens"] == 7
    assert torch.equal(
        load_file(weights)["lm_head.weight"],
        load_file(qwen_dir / "model.safetensors")["lm_head.weight"],
    )


def test_s3_endpoint_can_come_from_the_caller(
    qwen_dir, s3_server, s3_bucket, tmp_path, monkeypatch
):
    upload(s3_server.client(), qwen_dir, s3_bucket, "models/q")
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # as with `storage.endpoint_url` in a job spec
    pre = load_preprocessor(
        f"s3://{s3_bucket}/models/q", cache_dir=str(tmp_path), endpoint_url=s3_server.endpoint
    )
    assert pre.family == "qwen2_5_vl"


def test_missing_s3_prefix_is_one_clear_error(s3_server, s3_bucket, tmp_path):
    with pytest.raises(ModelNotFoundError, match="no objects under") as err:
        load_vlm(f"s3://{s3_bucket}/nothing-here", cache_dir=str(tmp_path))
    assert "\n" not in str(err.value)


def test_bad_local_path_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_vlm(str(tmp_path / "missing"))
    assert isinstance(err.value, ModelNotFoundError) and "\n" not in str(err.value)
    with pytest.raises(ModelNotFoundError, match="no model config"):
        load_preprocessor(str(tmp_path))  # a folder, but no checkpoint in it


def test_unsupported_model_type_and_family_mismatch(qwen_dir, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="unsupported model_type 'bert'") as err:
        load_vlm(str(tmp_path))
    assert isinstance(err.value, UnsupportedModelError) and "\n" not in str(err.value)
    with pytest.raises(UnsupportedModelError, match="family 'llava' requested"):
        load_preprocessor(str(qwen_dir), family="llava")


def test_missing_chat_template_fails_at_load(qwen_dir, tmp_path):
    folder = tmp_path / "no-template"
    shutil.copytree(qwen_dir, folder)
    for path in folder.glob("chat_template.*"):
        path.unlink()
    with pytest.raises(UnsupportedModelError, match="no chat template") as err:
        load_preprocessor(str(folder))
    assert "\n" not in str(err.value)


def test_pickle_weights_are_refused(qwen_dir, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(qwen_dir, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="cannot load weights"):
        load_vlm(str(folder))


def test_remote_code_is_not_run_by_default(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "config.json").write_text(
        json.dumps(
            {"model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}
        )
    )
    (tmp_path / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\n"
        "from transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
    )
    with pytest.raises(UnsupportedModelError, match="custom code") as err:
        load_vlm(str(tmp_path))
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_qwen_processor_gotcha_is_handled(qwen_dir):
    try:
        stock = AutoProcessor.from_pretrained(qwen_dir)
    except ImportError:  # the video processor wants torchvision
        stock = None
    assert getattr(stock, "image_processor", None) is None  # stock loading is unusable here
    pre = load_preprocessor(str(qwen_dir))
    assert pre.processor.image_processor is not None
    item = pre.prepare(images()[1], "How many cars?")
    n_image = int((item.input_ids == pre.processor.image_token_id).sum())
    assert n_image == int(item.image_grid_thw.prod()) // 4


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_attention_implementation_reaches_the_model(qwen_dir, attn):
    vlm = load_vlm(str(qwen_dir), attn_implementation=attn)
    assert vlm.model.config._attn_implementation == attn
    assert vlm.model.config.vision_config._attn_implementation == attn


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash_attn here")
def test_flash_attention_without_flash_attn_is_one_clear_error(qwen_dir):
    with pytest.raises(ImportError, match=r"^model\.attn_implementation: flash_attention_2 needs"):
        load_vlm(str(qwen_dir), attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        load_vlm(str(qwen_dir), attn_implementation="flash")


@pytest.mark.parametrize(
    "key",
    [
        "bkt/models/q/../escape.json",
        "bkt/models/q/sub/../../escape.json",
        "bkt/models/q/..",
        "bkt/models/q//etc/passwd",
        "bkt/models/q/./config.json",
        "bkt/models/q-sibling/config.json",
        "bkt/models/q",
    ],
)
def test_s3_keys_that_would_escape_the_cache_are_refused(key, tmp_path, monkeypatch):
    """AWS stores keys such as ``a/../../x`` as written (SeaweedFS refuses them at upload, so
    the listing is stubbed): the download is refused before anything is written."""
    import fsspec

    from resprune.loading import cache_relpath, fetch_s3_prefix

    assert cache_relpath("bkt/models/q/sub/model.safetensors", "bkt/models/q") == (
        "sub/model.safetensors"
    )
    with pytest.raises(ModelNotFoundError, match="refusing s3://"):
        cache_relpath(key, "bkt/models/q")

    fetched = []

    class Listing:
        def find(self, prefix, detail):
            return {
                "bkt/models/q/config.json": {"size": 2, "ETag": "a"},
                key: {"size": 2, "ETag": "b"},
            }

        def get(self, remote, local):
            fetched.append(remote)

    monkeypatch.setattr(fsspec, "filesystem", lambda *args, **kwargs: Listing())
    cache = tmp_path / "cache"
    with pytest.raises(ModelNotFoundError, match="refusing s3://") as err:
        fetch_s3_prefix("s3://bkt/models/q/", cache_dir=str(cache))
    assert "\n" not in str(err.value)
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".lock"]
    assert fetched == [] and written == []


def _merged_tokens(item) -> int:
    t, h, w = (int(v) for v in item.image_grid_thw)
    return t * h * w // 4


def test_qwen_images_are_resized_to_at_most_max_pixels(qwen_dir, tmp_path):
    """A 12 MP phone photo against the real checkpoint's 12.8 MP cap: the default
    model.max_pixels resizes it to at most 1280 merged tokens (not ~15k), a smaller setting to
    fewer, and a tiny image is scaled up to min_pixels; nothing is refused."""
    from PIL import Image

    from pipeline.spec import QWEN_MAX_PIXELS, ModelSpec
    from resprune.models.qwen_processor import DEFAULT_MAX_PIXELS

    assert ModelSpec(path="m").max_pixels == QWEN_MAX_PIXELS == DEFAULT_MAX_PIXELS
    folder = tmp_path / "hub-sized"
    shutil.copytree(qwen_dir, folder)
    config = json.loads((folder / "preprocessor_config.json").read_text())
    config["size"] = {"longest_edge": 12845056, "shortest_edge": 3136}  # Qwen2.5-VL-7B's
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    photo = Image.new("RGB", (4032, 3024), (120, 80, 40))
    checkpoint = load_preprocessor(str(folder), max_pixels=None)
    with pytest.raises(ItemError, match=r"prompt has 1\d{4} tokens"):  # ~15.5k: the problem
        checkpoint.prepare(photo, "What is it?")
    default = load_preprocessor(str(folder))
    item = default.prepare(photo, "What is it?")
    assert 1000 < _merged_tokens(item) <= DEFAULT_MAX_PIXELS // (28 * 28)
    assert int((item.input_ids == default.processor.image_token_id).sum()) == _merged_tokens(item)
    small = load_preprocessor(str(folder), max_pixels=200_704, min_pixels=100_000)
    assert 100_000 // 784 <= _merged_tokens(small.prepare(photo, "q")) <= 256
    assert _merged_tokens(small.prepare(Image.new("RGB", (40, 30)), "q")) >= 100_000 // 784
    # the tiny checkpoint's own cap (336 x 336) is below the default: it stays
    tiny = load_preprocessor(str(qwen_dir))
    assert _merged_tokens(tiny.prepare(photo, "q")) <= 336 * 336 // 784
    with pytest.raises(ValueError, match="min_pixels"):
        load_preprocessor(str(qwen_dir), min_pixels=200_000)  # above the checkpoint's cap


def test_pixel_bounds_are_validated_in_the_spec():
    from pipeline.spec import ModelSpec, SpecError, parse_spec

    assert ModelSpec(path="m", max_pixels=None, min_pixels=3136).max_pixels is None
    doc = {"name": "t", "input": {"uri": "i/"}, "output": {"uri": "o/"}}
    for model, message in (
        ({"max_pixels": 100}, "model.max_pixels"),
        ({"min_pixels": 0}, "model.min_pixels"),
        ({"min_pixels": 600_000, "max_pixels": 500_000}, "must be <= model.max_pixels"),
    ):
        with pytest.raises(SpecError, match=message):
            parse_spec({**doc, "model": {"path": "m", **model}})
