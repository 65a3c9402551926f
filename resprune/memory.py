"""Memory turned into batch size: the LLM-token budget per model batch from free device memory.

A batch's memory beyond the weights is its KV cache plus the transient activations of the
layer being run, both proportional to the batch's LLM tokens (prompt after pruning + new
tokens, the cost `pipeline.stages.answer.pack` packs by). So the budget is

    tokens = (free bytes after the weights are loaded) * (1 - RESERVE_SHARE)
             / (KV bytes per token + activation bytes per token)

with KV bytes per token = layers * kv heads * head_dim * 2 (K and V) * dtype bytes, and
activation bytes per token = (6 * hidden + 3 * intermediate) * dtype bytes (one decoder
layer's prefill transients: q, k, v, attention output, residual and norm; MLP gate, up and
activation). RESERVE_SHARE keeps room for the vision tower, the selector's Gram matrix,
CUDA graphs, allocator fragmentation and a static cache's rounded-up length. Pruning shrinks
every item's tokens, so the same memory holds several times more pruned items. On the CPU
``auto`` is DEFAULT_CPU_BATCH_TOKENS (host memory is not the limit there; time is).
"""

from __future__ import annotations

from typing import Any

import torch

DEFAULT_CPU_BATCH_TOKENS = 16384
RESERVE_SHARE = 0.15


def kv_bytes_per_token(text_config: Any, dtype: torch.dtype) -> int:
    """KV-cache bytes one token holds: layers x kv heads x head_dim x 2 (K, V) x dtype bytes."""
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    size = torch.empty((), dtype=dtype).element_size()
    return text_config.num_hidden_layers * kv_heads * head_dim * 2 * size


def activation_bytes_per_token(text_config: Any, dtype: torch.dtype) -> int:
    """Transient bytes per token while one decoder layer runs (see the module docstring)."""
    size = torch.empty((), dtype=dtype).element_size()
    return (6 * text_config.hidden_size + 3 * text_config.intermediate_size) * size


def batch_token_budget(free_bytes: int, text_config: Any, dtype: torch.dtype) -> int:
    """LLM tokens per batch that fit in ``free_bytes`` with the reserve kept back."""
    per_token = kv_bytes_per_token(text_config, dtype) + activation_bytes_per_token(
        text_config, dtype
    )
    return max(1, int(free_bytes * (1 - RESERVE_SHARE)) // per_token)


def resolve_batch_tokens(setting: int | str | None, model: Any, device: torch.device) -> int | None:
    """``execution.max_batch_tokens`` as a number: ints and None pass, ``auto`` is computed.

    Call after the weights are on the device: ``auto`` reads the free memory left then
    (``torch.cuda.mem_get_info``); on the CPU it is DEFAULT_CPU_BATCH_TOKENS.
    """
    if setting != "auto":
        return setting  # type: ignore[return-value]
    if device.type != "cuda":
        return DEFAULT_CPU_BATCH_TOKENS
    free, _ = torch.cuda.mem_get_info(device)
    return batch_token_budget(free, model.config.text_config, model.dtype)
