"""Causal softmax attention on `ops.attention` (flash-attn layout `[B, T, H, D]`, GQA, optional clipping), and
on `ops.decode_attention` over a KV cache."""
from __future__ import annotations

import torch

from .. import ops
from .base import OpModule


class Attention(OpModule):
    """Softmax attention on `[B, T, H, D]` (k/v may have fewer heads), q/k/v clamped to ±`clip` first when set.

    `forward(q, k, v)` attends over k/v; `forward(q, k_cache, v_cache, seqlens)` is decoding over caches
    `[B, S, Hkv, D]` of which sequence b holds `seqlens[b]` valid keys, the new tokens' last (`ops.decode_attention`:
    causal within the new tokens, no clipping - clip before caching). `window`: a sliding window (keys per query,
    itself included), in both forms.

    OLMo 1.7 clips the fused qkv projection *before* RoPE; there, clip with `ops.qkv_rope` (`QKVRope`) instead and
    leave `clip` unset here.
    """

    def __init__(self, causal: bool = True, clip: float | None = None, scale: float | None = None,
                 window: int | None = None, backend: str | None = None) -> None:
        super().__init__(backend)
        self.causal, self.clip, self.scale, self.window = causal, clip, scale, window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                seqlens: torch.Tensor | None = None) -> torch.Tensor:
        if seqlens is None:
            return ops.attention(q, k, v, causal=self.causal, clip=self.clip, scale=self.scale, window=self.window,
                                 backend=self.backend)
        if self.clip is not None or not self.causal:
            raise ValueError("decoding over a KV cache is causal and unclipped: use Attention(causal=True, clip=None)")
        return ops.decode_attention(q, k, v, seqlens, scale=self.scale, window=self.window, backend=self.backend)

    def extra_repr(self) -> str:
        return f"causal={self.causal}, clip={self.clip}, window={self.window}, backend={self.backend}"
