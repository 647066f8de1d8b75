"""SwiGLU feed-forward pieces on `ops.swiglu` (OLMo's fused `[x | gate]` layout) and `ops.silu_mul`
(Llama's separate gate/up projections)."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .base import OpModule


class SwiGLU(OpModule):
    """`[x | gate]` -> `silu(gate) * x` on the last dim (OLMo's fused `ff_proj` layout: first half is up)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return ops.swiglu(h, backend=self.backend)


class SwiGLUMLP(OpModule):
    """Llama-style MLP: `down_proj(silu(gate_proj(x)) * up_proj(x))`, with transformers' parameter names
    (`gate_proj`, `up_proj`, `down_proj`), so a `LlamaMLP` state dict loads into it as it is."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False,
                 backend: str | None = None) -> None:
        super().__init__(backend)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.silu_mul(self.gate_proj(x), self.up_proj(x), backend=self.backend))
