"""Rotary position embedding on `ops.rope`: fp32 angles and rotation, NeoX rotate-half layout (OLMo's,
Llama's in transformers) or GPT-J's interleaved pairs."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops


def apply_rope(q: torch.Tensor, k: torch.Tensor, *, positions: torch.Tensor | None = None,
               offset: int | torch.Tensor = 0, theta: float = 10000.0, interleaved: bool = False,
               heads_first: bool = False, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by their positions: `[B, T, H, D]` (flash-attn layout), or with `heads_first`
    `[B, H, T, D]` (transformers' layout; returned in that layout). Positions: `positions` (`[T]` or `[B, T]`)
    or `offset + arange(T)`."""
    if heads_first:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    q, k = ops.rope(q, k, positions=positions, offset=offset, theta=theta, interleaved=interleaved, backend=backend)
    return (q.transpose(1, 2), k.transpose(1, 2)) if heads_first else (q, k)


class RotaryEmbedding(nn.Module):
    """`forward(q, k, positions=None, offset=0)` -> rotated `(q, k)`; see `apply_rope`."""

    def __init__(self, theta: float = 10000.0, interleaved: bool = False, heads_first: bool = False,
                 backend: str | None = None) -> None:
        super().__init__()
        self.theta, self.interleaved, self.heads_first, self.backend = theta, interleaved, heads_first, backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor | None = None,
                offset: int | torch.Tensor = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rope(q, k, positions=positions, offset=offset, theta=self.theta, interleaved=self.interleaved,
                          heads_first=self.heads_first, backend=self.backend)

    def extra_repr(self) -> str:
        return f"theta={self.theta}, interleaved={self.interleaved}, backend={self.backend}"
