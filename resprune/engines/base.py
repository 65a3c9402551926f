"""The engine protocol: what generates from the kept sequences once selection is done.

Selection (vision tower, pruner, kept features, statistics, positions) is ours and lives in
`resprune.answer`; an engine only turns a batch of kept sequences into greedy answers. Each
sequence arrives as a `Plan`: the prompt ids with the image-token run cut to the K kept
tokens, the K kept features in sequence order (LLaVA-NeXT: kept tokens plus kept newline
rows), the positions of the kept prompt, the unpruned prompt ids for engines that
rebuild the prompt themselves, and the family's extras: side rows that follow the kept
features (DeepStack) and per-token inputs of the kept prompt (token types), both generic
and handed to the model through the family's adapter. An engine answers per row: a
failure that belongs to one sequence (e.g. a request an engine refuses) is that row's
`ItemError`; an exception raised from ``generate`` is a failure of the whole batch (the
caller retries items one at a time), except `EngineDead`: the engine itself can answer
nothing more in this process (vLLM's ``EngineDeadError``, an engine-core failure), so the
caller must not blame items but restart the process. Non-goals: sampling (decoding is
greedy), streaming.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from resprune.items import ItemError

if TYPE_CHECKING:
    import torch


class EngineDead(RuntimeError):
    """The engine cannot answer anything more in this process; restart it (never an item's
    fault, never an error row)."""


_DEAD_ENGINE_TYPES = ("EngineDead", "EngineDeadError")


def engine_dead(exc: BaseException | None) -> bool:
    """`EngineDead` or vLLM's ``EngineDeadError`` anywhere in ``exc``'s chain (matched by
    class name: no vLLM import)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if type(exc).__name__ in _DEAD_ENGINE_TYPES:
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


@dataclass
class Plan:
    """One kept sequence, ready to generate from (all tensors on the VLM's device)."""

    ids: torch.Tensor  # long [L']: prompt ids, the image-token run cut to the K kept tokens
    features: torch.Tensor  # [K, D] kept features in sequence order, in the model's dtype
    positions: torch.Tensor  # long [R, L'] (R = 1, or 3 for M-RoPE) of the kept prompt
    prompt_ids: torch.Tensor  # long [L]: the unpruned prompt (full image-token run)
    # [K, S, D_s] side rows of the kept features, in the same order (Qwen3-VL: DeepStack
    # levels), or None; the adapter's encoder_output hands them to the model
    side: torch.Tensor | None = None
    # per-token inputs of the kept prompt besides ids, by the model's keyword (long [L'] each,
    # e.g. Gemma 3's token_type_ids): the adapter's token_extras
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Generation:
    """One greedy answer: its text and token ids (up to and including EOS, if reached)."""

    text: str
    token_ids: list[int]


class Engine(Protocol):
    """Generates greedy answers for a batch of kept sequences; one result per plan, in order."""

    name: str

    def generate(self, plans: Sequence[Plan], max_new_tokens: int) -> list[Generation | ItemError]:
        """Answer every plan with at most ``max_new_tokens`` new tokens."""
        ...
