"""Building blocks usable in any PyTorch model; each calls one functional op from `olmo_fast.ops`."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops

__all__ = ["LayerNorm", "SwiGLU", "Attention"]


class LayerNorm(nn.Module):
    """Non-parametric LayerNorm (OLMo's): no weight, no bias, fp32 statistics, output in the input dtype.

    `forward(x, residual)` adds the residual first and returns `(LN(x + residual), x + residual)`.
    """

    def __init__(self, eps: float = 1e-5, backend: str | None = None) -> None:
        super().__init__()
        self.eps, self.backend = eps, backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return ops.layer_norm(x, eps=self.eps, residual=residual, backend=self.backend)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, backend={self.backend}"


class SwiGLU(nn.Module):
    """`[x | gate]` -> `silu(gate) * x` on the last dim (OLMo's fused `ff_proj` layout)."""

    def __init__(self, backend: str | None = None) -> None:
        super().__init__()
        self.backend = backend

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return ops.swiglu(h, backend=self.backend)


class Attention(nn.Module):
    """Causal softmax attention on `[B, T, H, D]` with optional q/k/v clipping."""

    def __init__(self, causal: bool = True, clip: float | None = None, backend: str | None = None) -> None:
        super().__init__()
        self.causal, self.clip, self.backend = causal, clip, backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return ops.attention(q, k, v, causal=self.causal, clip=self.clip, backend=self.backend)
