"""The vLLM engine: kept features in as image embeddings, all rows of a batch in one run.

One ``vllm.LLM`` per engine, loaded once (safetensors only) from the checkpoint the VLM came
from: its folder (an ``s3://`` model is already in the local cache) or its hub id and
revision. Each plan becomes one request: its prompt ids with the kept image-token run folded
back to a single placeholder, and its K kept features (LLaVA-NeXT: kept tokens plus kept
newline rows, in sequence order) as an image embedding from which vLLM sizes the
placeholder run again. Every request is enqueued, then one ``wait_for_completion`` lets
vLLM's scheduler batch them continuously. Decoding is greedy.

Positions: vLLM numbers LLaVA prompts 0..L-1 (our ``contiguous`` policy). A Qwen2.5-VL
request also carries each kept token's M-RoPE position and where the text after the image
resumes, and vLLM's own pruning path (`resprune.engines.vllm_qwen`) places them, so both
policies hold; the engine checks each plan's positions are what vLLM will use.

Host reads: a request is host data (ids, positions, the features vLLM copies in itself), so
`generate` reads every plan's ids, positions and features back with one device wait
(`host_plans`, `resprune.host.to_host`) and builds the requests from those host copies: one
host read per batch, never per row.

Per row: a prompt whose new tokens would not fit ``max_model_len`` is ``prompt_too_long``
(as the transformers engine does with the model's context); a request vLLM refuses is
``model_error``; vLLM refusing every request of a batch of several is the engine's fault.
A failure of the engine itself (vLLM's ``EngineDeadError``, or anything
raised while the engine steps: with the in-process engine core on CPU that is the core's
own failure) raises `EngineDead`: the engine is dead for this process, the caller restarts
it, no row is blamed. Before vLLM loads, the transformers copy's decoder layers and head are
dropped (selection needs only the vision tower, projector and input embeddings): the weights
are not held twice and vLLM finds the memory it asks for. On CPU the engine core runs
in-process with a 512 MiB KV cache and no compilation unless told otherwise.
Non-goals: sampling, streaming, several images per prompt.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from resprune.engines.base import EngineDead, Generation, Plan, engine_dead
from resprune.engines.hf import decode
from resprune.engines.vllm_plugin import (
    ARCHITECTURES,
    MROPE_FAMILIES,
    WRAPPED_RUN,
    UnsupportedVllm,
    register,
    vllm_refusal,
    vllm_version_problem,
)
from resprune.host import to_host
from resprune.items import ItemError
from resprune.models.base import VLM

CPU_KV_CACHE_BYTES = 512 << 20  # vLLM on CPU sizes its cache from RAM unless told
# Any rate > 0 opens vLLM's multimodal pruning path (MultiModalConfig.
# is_multimodal_pruning_enabled); videos are refused, so it never prunes a video.
PRUNING_GATE_RATE = 0.5
REFUSED = "vLLM refused the request"  # a row vLLM's input processing would not take


class UnsupportedByVllm(ValueError):
    """The model family cannot generate from pruned embeddings through vLLM."""


class VllmEngine:
    """Greedy generation of kept sequences by one ``vllm.LLM`` (LLaVA-1.5, LLaVA-NeXT,
    Qwen2.5-VL)."""

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
        problem = vllm_version_problem()
        if problem:
            raise UnsupportedVllm(problem)
        self.vlm = vlm
        self.qwen = vlm.family in MROPE_FAMILIES
        self.wrapped = vlm.family in WRAPPED_RUN
        self.image_token_id = int(vlm.model.config.image_token_id)
        self.dead: str | None = None  # why the engine died, once it has
        cpu = vlm.device.type == "cpu"
        if cpu:  # in-process engine core: no process to spawn, no core to keep free for it
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        register()
        from vllm import LLM

        release_text_weights(vlm)
        family_options = (
            {  # vLLM's pruning path places the kept tokens (resprune.engines.vllm_qwen)
                "limit_mm_per_prompt": {"image": 1, "video": 0},
                "video_pruning_rate": PRUNING_GATE_RATE,
                "enable_prefix_caching": False,  # a hit past the image would skip the recompute
            }
            if self.qwen
            else {"limit_mm_per_prompt": {"image": 1}}
        )
        self.llm = LLM(
            model=vlm.local_path,
            revision=vlm.revision,
            tokenizer_revision=vlm.revision,
            load_format="safetensors",
            dtype=str(vlm.model.dtype).removeprefix("torch."),
            hf_overrides={"architectures": [ARCHITECTURES[vlm.family]]},
            enable_mm_embeds=True,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory_bytes=kv_cache_memory_bytes or (CPU_KV_CACHE_BYTES if cpu else None),
            enforce_eager=cpu if enforce_eager is None else enforce_eager,
            seed=0,
            **family_options,
        )

    def generate(self, plans: Sequence[Plan], max_new_tokens: int) -> list[Generation | ItemError]:
        """Enqueue one request per plan, run them together, answer per row in plan order.

        Raises `EngineDead` when the engine fails (then and on every later call)."""
        from vllm import SamplingParams

        if self.dead:
            raise EngineDead(self.dead)
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, detokenize=False)
        slots: list[tuple[str, str] | ItemError] = []
        hosts = host_plans(plans)  # the batch's one device read
        try:
            for plan in hosts:
                slots.append(self._enqueue(plan, params, max_new_tokens))
            queued = [s for s in slots if not isinstance(s, ItemError)]
            self._refused_all(slots)
            done = self.llm.wait_for_completion(use_tqdm=False) if queued else []
        except EngineDead:
            raise
        except Exception as err:
            raise self._die(err, [s[1] for s in slots if not isinstance(s, ItemError)]) from err
        by_id = {out.request_id: list(out.outputs[0].token_ids) for out in done}
        return [self._answer(by_id, slot) for slot in slots]

    def request(self, plan: HostPlan) -> dict:
        """The vLLM prompt of a plan: one image placeholder, the kept features as embeddings
        (Qwen2.5-VL: with their M-RoPE position channels)."""
        ids = plan.ids.tolist()
        run = [j for j, t in enumerate(ids) if t == self.image_token_id]
        if run:
            cut = int(self.wrapped)  # InternVL: vLLM adds <img> ... </img> itself
            ids = [*ids[: run[0] - cut], self.image_token_id, *ids[run[-1] + 1 + cut :]]
        embeds = plan.features[None]  # DeepStack rows already follow each feature (host_plans)
        if not self.qwen:
            return {"prompt_token_ids": ids, "multi_modal_data": {"image": embeds}}
        mrope = qwen_mrope_channels(plan, self.image_token_id)
        image = {"image_embeds": embeds, "image_mrope": mrope[None]}
        return {"prompt_token_ids": ids, "multi_modal_data": {"image": image}}

    def _enqueue(self, plan: HostPlan, params, max_new_tokens: int) -> tuple[str, str] | ItemError:
        """(our request id, vLLM's internal id) once vLLM has it, or this row's error."""
        refused = self._too_long(len(plan.ids), max_new_tokens) or self._positions(plan)
        if refused:
            return refused
        try:
            request = self.request(plan)
        except ValueError as err:  # qwen_mrope_channels: positions its numbering cannot carry
            return ItemError("model_error", f"positions vLLM cannot take: {err}")
        try:
            (internal_id,) = self.llm.enqueue(request, params, use_tqdm=False)
        except Exception as err:  # vLLM's input processing refused this row alone ...
            if engine_dead(err):  # ... unless the engine is gone
                raise
            return ItemError("model_error", f"{REFUSED}: {_one_line(err)}")
        # vLLM appends "-<8 random chars>" to its own ids in the outputs' request_id
        return internal_id.rsplit("-", 1)[0], internal_id

    def _refused_all(self, slots: list[tuple[str, str] | ItemError]) -> None:
        """Raise `EngineDead` when vLLM refused every request of a batch of several: a
        plugin or version mismatch, not the items (they would be committed as final errors
        that no rerun retries). A lone refusal stays the item's ``model_error``, and the
        model stage judges a pattern of them (`pipeline.stages.failures.ErrorWindow`)."""
        refused = [s for s in slots if isinstance(s, ItemError) and s.message.startswith(REFUSED)]
        if len(slots) < 2 or len(refused) < len(slots):
            return
        self.dead = (
            f"the vLLM engine refused every request of a batch of {len(slots)} (a fault of "
            f"the engine or its plugin, not of the items): {refused[0].message}"
        )
        raise EngineDead(self.dead)

    def _positions(self, plan: HostPlan) -> ItemError | None:
        """model_error when vLLM would number this LLaVA plan otherwise than its positions
        say (Qwen2.5-VL's are checked as its request is built)."""
        if self.qwen:
            return None
        n = len(plan.ids)
        if plan.positions.shape[0] == 1 and np.array_equal(plan.positions[0], np.arange(n)):
            return None
        return ItemError(
            "model_error",
            "positions vLLM cannot take: it numbers LLaVA prompts 0..L-1 "
            "(pruning.position_policy: contiguous)",
        )

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

    def _answer(
        self, by_id: dict[str, list[int]], slot: tuple[str, str] | ItemError
    ) -> Generation | ItemError:
        if isinstance(slot, ItemError):
            return slot
        if slot[0] not in by_id:
            return ItemError("model_error", f"vLLM returned no output for request {slot[0]}")
        return decode(self.vlm, torch.tensor([by_id[slot[0]]], dtype=torch.long))[0]

    def _die(self, err: BaseException, internal_ids: list[str]) -> EngineDead:
        """Mark the engine dead (every later call raises too) and drop our requests from it."""
        self.dead = f"the vLLM engine failed: {type(err).__name__}: {_one_line(err)}"
        # a live in-process core keeps them otherwise; a dead one refuses, which is fine
        with contextlib.suppress(Exception):
            self.llm.llm_engine.abort_request(internal_ids, internal=True)
        return EngineDead(self.dead)


@dataclass
class HostPlan:
    """A `Plan` read back to the host: what a vLLM request is built from."""

    ids: np.ndarray  # [L']
    positions: np.ndarray  # [R, L']
    features: torch.Tensor  # [K, D] on the host, in the model's dtype


def host_plans(plans: Sequence[Plan]) -> list[HostPlan]:
    """Every plan's ids, positions and features on the host, read with one device wait."""
    if not plans:
        return []
    arrays = iter(to_host(*[t for p in plans for t in (p.ids, p.positions, _embeds(p))]))
    return [
        HostPlan(next(arrays), next(arrays), torch.from_numpy(next(arrays)).to(p.features.dtype))
        for p in plans
    ]


def _embeds(plan: Plan) -> torch.Tensor:
    """The rows vLLM takes per kept token: the feature, then (Qwen3-VL) its DeepStack rows,
    level by level."""
    if plan.side is None:
        return plan.features
    return torch.cat([plan.features, plan.side.flatten(1)], dim=1)


def qwen_mrope_channels(plan: HostPlan, image_token_id: int) -> torch.Tensor:
    """The [K, 4] channels vLLM's ``recompute_mrope_positions`` turns back into ``plan``'s
    M-RoPE positions: each kept token's (t, h, w) relative to the image start, and the offset
    where the text after the image resumes. Raises ValueError when no channels can: vLLM
    numbers the text before the image 0..s-1 and the text after it contiguously."""
    ids, pos = torch.from_numpy(plan.ids), torch.from_numpy(plan.positions).long()
    run = torch.nonzero(ids == image_token_id).flatten()
    if pos.shape[0] != 3:
        raise ValueError(f"M-RoPE positions have 3 rows, got {pos.shape[0]}")
    if len(run) == 0 or int(run[-1] - run[0]) + 1 != len(run) or run[0] == 0:
        raise ValueError("the kept image tokens must form one run after the first token")
    start, end, n = int(run[0]), int(run[-1]) + 1, len(ids)
    if not torch.equal(pos[:, :start], torch.arange(start).expand(3, start)):
        raise ValueError("the text before the image is not numbered 0..s-1")
    base = start  # vLLM: the position after <|vision_start|>
    after = pos[0, end] - base if end < n else pos[:, start:end].max() + 1 - base
    tail = torch.arange(n - end) + base + after
    if not torch.equal(pos[:, end:], tail.expand(3, n - end)):
        raise ValueError("the text after the image is not numbered contiguously")
    rel = pos[:, start:end] - base
    return torch.cat([rel.T, torch.full((end - start, 1), int(after))], dim=1)


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


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
