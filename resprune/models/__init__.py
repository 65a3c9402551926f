"""Model-family adapters, by family name (= the checkpoint's ``model_type``)."""

from __future__ import annotations

from resprune.models.base import VLM, Adapter
from resprune.models.gemma3 import Gemma3Adapter
from resprune.models.internvl import InternVLAdapter
from resprune.models.llava import LlavaAdapter
from resprune.models.llava_next import LlavaNextAdapter
from resprune.models.qwen2_5_vl import Qwen2_5_VLAdapter
from resprune.models.qwen3_vl import Qwen3VLAdapter

ADAPTERS: dict[str, Adapter] = {
    a.family: a
    for a in (
        LlavaAdapter(),
        LlavaNextAdapter(),
        Qwen2_5_VLAdapter(),
        Qwen3VLAdapter("qwen3_vl"),
        Qwen3VLAdapter("qwen3_vl_moe"),
        Gemma3Adapter(),
        InternVLAdapter(),
    )
}
FAMILIES = tuple(ADAPTERS)

__all__ = ["ADAPTERS", "FAMILIES", "VLM", "Adapter"]
