"""Causal softmax attention on `ops.attention` (flash-attn layout `[B, T, H, D]`, GQA, optional clipping)."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops


class Attention(nn.Module):
    """Softmax attention on `[B, T, H, D]` (k/v may have fewer heads), q/k/v clamped to ±`clip` first when set.

    OLMo 1.7 clips the fused qkv projection *before* RoPE; there, clip with `ops.qkv_rope` instead and leave
    `clip` unset here.
    """

    def __init__(self, causal: bool = True, clip: float | None = None, scale: float | None = None,
                 backend: str | None = None) -> None:
        super().__init__()
        self.causal, self.clip, self.scale, self.backend = causal, clip, scale, backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return ops.attention(q, k, v, causal=self.causal, clip=self.clip, scale=self.scale, backend=self.backend)

    def extra_repr(self) -> str:
        return f"causal={self.causal}, clip={self.clip}, backend={self.backend}"
