"""A static, preallocated KV cache for batched decoding (implements `olmo_fast.model.KVCache`).

Layout: per layer, `k` and `v` of shape `[B, S, Hkv, D]` in the model's dtype, allocated once. The batch is
right-padded: sequence b keeps its tokens in slots `0 .. lengths[b] - 1`; slots past that may hold anything
(padding of a ragged prefill, or a finished sequence's rewrites) and are never attended to.

Two phases:
- prefill (`rope_offset == 0`, the cache empty): the new tokens of every sequence sit at slots `0 .. T-1`
  (right-padded prompts), so plain causal attention over the new block is exact for every real token of a
  ragged batch; padded queries compute garbage that nobody reads. `start(lengths)` then sets each length.
- decode: each new token's k/v go to slot `lengths[b]` (+ t for several new tokens) and the block's attention
  module attends over `lengths[b] + T` keys (`ops.decode_attention`). `lengths` is one tensor updated in place,
  so a CUDA graph captured around a decode step stays valid from step to step.
The cache holds tensors only: the block's `nn.Attention` attends over what `update` returns, on its own backend
(so `OLMo.set_backend` reaches decoding through an existing cache). OLMo 3's sliding-window layers keep the full
cache too: their `Attention` holds the window and passes it to the prefill and decode attention, which skip the
keys outside it. Bytes per layer: 2 * B * S * Hkv * D *
element size.
"""
from __future__ import annotations

import torch

from .config import ModelConfig


class StaticKVCache:
    def __init__(self, config: ModelConfig, batch_size: int, max_length: int, device: torch.device | str,
                 dtype: torch.dtype) -> None:
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"a KV cache needs batch_size >= 1 and max_length >= 1, got {batch_size}, {max_length}")
        shape = (batch_size, max_length, config.n_kv_heads, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.lengths = torch.zeros(batch_size, device=device, dtype=torch.int32)
        self.max_length = max_length
        self._rows = torch.arange(batch_size, device=device).view(-1, 1)
        self._prefill = True
        self._slots: torch.Tensor | None = None  # this forward's write slots [B, T], set by layer 0
        self._seqlens: torch.Tensor | None = None  # this forward's key counts [B]

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def rope_offset(self) -> int | torch.Tensor:
        return 0 if self._prefill else self.lengths

    def start(self, lengths: torch.Tensor) -> None:
        """End the prefill: sequence b now holds `lengths[b]` tokens."""
        if int(lengths.max()) > self.max_length:
            raise ValueError(f"prompt of {int(lengths.max())} tokens does not fit a cache of {self.max_length} slots")
        self.lengths.copy_(lengths)
        self._prefill = False

    def reset(self) -> None:
        """Empty the cache (the next forward is a prefill again); the buffers are kept."""
        self.lengths.zero_()
        self._prefill = True

    def advance(self, counts: torch.Tensor | int) -> None:
        """Sequence b has stored `counts[b]` (0 or 1 per decode step) more tokens; in place (graph-safe)."""
        self.lengths.add_(counts)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store the new tokens' k, v `[B, T, Hkv, D]` for `layer`. Prefill: returns `(k, v, None)` (causal
        attention over the new block); decode: this layer's caches `[B, S, Hkv, D]` and the key counts `[B]`."""
        T = k.shape[1]
        if self._prefill:
            if T > self.max_length:
                raise ValueError(f"{T} tokens do not fit a cache of {self.max_length} slots")
            self.k[layer][:, :T] = k
            self.v[layer][:, :T] = v
            return k, v, None
        if layer == 0:  # the same for every layer of this forward: computed once
            self._slots = self.lengths.view(-1, 1).long() + torch.arange(T, device=k.device)
            self._seqlens = self.lengths + T
        self.k[layer][self._rows, self._slots] = k
        self.v[layer][self._rows, self._slots] = v
        return self.k[layer], self.v[layer], self._seqlens

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
