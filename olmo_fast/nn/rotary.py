"""Rotary position embedding on `ops.rope`: fp32 angles and rotation, NeoX rotate-half layout (OLMo's,
Llama's in transformers) or GPT-J's interleaved pairs; and OLMo's fused attention prologue on `ops.qkv_rope`."""
from __future__ import annotations

import torch

from .. import ops
from .base import OpModule


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


class RotaryEmbedding(OpModule):
    """`forward(q, k, positions=None, offset=0)` -> rotated `(q, k)`; see `apply_rope`."""

    def __init__(self, theta: float = 10000.0, interleaved: bool = False, heads_first: bool = False,
                 backend: str | None = None) -> None:
        super().__init__(backend)
        self.theta, self.interleaved, self.heads_first = theta, interleaved, heads_first

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor | None = None,
                offset: int | torch.Tensor = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rope(q, k, positions=positions, offset=offset, theta=self.theta, interleaved=self.interleaved,
                          heads_first=self.heads_first, backend=self.backend)

    def extra_repr(self) -> str:
        return f"theta={self.theta}, interleaved={self.interleaved}, backend={self.backend}"


class QKVRope(OpModule):
    """OLMo's attention prologue (`ops.qkv_rope`): the fused projection `[B, T, (Hq + 2 Hkv) D]`, clamped to ±`clip`
    when set (OLMo 1.7), split into q, k, v `[B, T, H, D]`, with RoPE on q and k at `positions` or
    `offset + arange(T)`. `forward(qkv, positions=None, offset=0)` -> `(q, k, v)`."""

    def __init__(self, n_heads: int, n_kv_heads: int, clip: float | None = None, theta: float = 10000.0,
                 backend: str | None = None) -> None:
        super().__init__(backend)
        self.n_heads, self.n_kv_heads, self.clip, self.theta = n_heads, n_kv_heads, clip, theta

    def forward(self, qkv: torch.Tensor, positions: torch.Tensor | None = None,
                offset: int | torch.Tensor = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return ops.qkv_rope(qkv, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, clip=self.clip, positions=positions,
                            offset=offset, theta=self.theta, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, clip={self.clip}, theta={self.theta}, "
                f"backend={self.backend}")
