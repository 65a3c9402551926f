"""Static KV caches for every (batch, length) shape, all backed by one reused set of buffers.

A compiled, CUDA-graph decode step needs its cache tensors at fixed addresses (transformers
marks them static); a fresh `StaticCache` per batch would move them, re-recording the graphs
every call, and keeping one cache per shape would cost the sum of their sizes. Here each
layer's keys and values are views at offset 0 of that layer's own flat buffer, grown when a
larger shape arrives: one shape always sees the same addresses, and memory is the largest
shape's cache, not the sum. Only one ``generate`` uses the pool at a time (an actor answers
one batch at a time). Layers other than plain `StaticLayer` (e.g. sliding windows) allocate
their own tensors as transformers does.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer
from transformers.configuration_utils import get_head_shapes

MAX_SHAPES = 64  # cache objects kept (they hold views, not memory); least recently used go


class CachePool:
    """Reset static caches by (batch, length); their tensors share per-layer buffers."""

    def __init__(self, text_config, dtype: torch.dtype, device: torch.device):
        self.config, self.dtype, self.device = text_config, dtype, device
        self.buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.caches: OrderedDict[tuple[int, int], StaticCache] = OrderedDict()
        self.grows = 0  # times the buffers moved (every cache tensor handed out before died)

    def get(self, batch: int, length: int) -> StaticCache:
        """A zeroed static cache for ``batch`` rows of up to ``length`` tokens."""
        key = (batch, length)
        cache = self.caches.pop(key, None)
        if cache is None:
            cache = StaticCache(config=self.config, max_cache_len=length)
            self._bind(cache, batch)
            while len(self.caches) >= MAX_SHAPES:
                self.caches.popitem(last=False)
        self.caches[key] = cache
        cache.reset()
        return cache

    def _bind(self, cache: StaticCache, batch: int) -> None:
        heads, dims = get_head_shapes(self.config)
        shapes = [
            (batch, _per_layer(heads, i), layer.max_cache_len, _per_layer(dims, i))
            for i, layer in enumerate(cache.layers)
        ]
        need = [s[0] * s[1] * s[2] * s[3] for s in shapes]
        if len(self.buffers) != len(need) or any(
            b[0].numel() < n for b, n in zip(self.buffers, need, strict=True)
        ):
            self._grow(need)
        for layer, shape, (keys, values) in zip(cache.layers, shapes, self.buffers, strict=True):
            if type(layer) is StaticLayer:
                n = shape[0] * shape[1] * shape[2] * shape[3]
                _attach(layer, keys[:n].view(shape), values[:n].view(shape))

    def _grow(self, need: list[int]) -> None:
        """New buffers (zeroed: stale NaNs would leak through masked attention) for ``need``."""
        old = [b[0].numel() for b in self.buffers] if len(self.buffers) == len(need) else need
        sizes = [max(n, o) for n, o in zip(need, old, strict=True)]
        self.buffers, self.caches = [], OrderedDict()  # free the old ones before allocating
        self.grows += 1
        for n in sizes:
            keys = torch.zeros(n, dtype=self.dtype, device=self.device)
            self.buffers.append((keys, torch.zeros_like(keys)))


def _per_layer(value: int | list[int], layer: int) -> int:
    return value[layer] if isinstance(value, list) else value


def _attach(layer: StaticLayer, keys: torch.Tensor, values: torch.Tensor) -> None:
    """What `StaticLayer.lazy_initialization` does, with our views instead of new tensors."""
    layer.dtype, layer.device = keys.dtype, keys.device
    layer.batch_size, layer.num_heads = keys.shape[:2]
    layer.k_head_dim, layer.v_head_dim = keys.shape[-1], values.shape[-1]
    layer.keys, layer.values = keys, values
    layer.cumulative_length = layer.cumulative_length.to(keys.device)
    for tensor in (layer.keys, layer.values, layer.cumulative_length):
        torch._dynamo.mark_static_address(tensor)
    layer.is_initialized = True
