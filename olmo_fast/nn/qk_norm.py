"""OLMo 2/3's attention prologue on `ops.qk_norm_rope`: the fused q|k|v projection, RMSNorm over the whole q and
the whole k projection (QK-norm), then RoPE (optionally frequency-scaled) on q and k, in one op."""
from __future__ import annotations

import torch

from .. import ops
from ..rope_scaling import RopeScaling
from .base import OpModule


class QKNormRope(OpModule):
    """`forward(qkv, q_weight, k_weight, positions=None, offset=0)` -> `(q, k, v)` `[B, T, H, D]`: qkv
    `[B, T, (Hq + 2 Hkv) D]` split, q RMS-normed over its `Hq * D` dims with `q_weight` and k over its `Hkv * D`
    dims with `k_weight` (fp32 statistics, eps `eps`), then rotated at `positions` or `offset + arange(T)` by
    the frequencies of `theta` and `rope_scaling`. The norm weights are passed in: the model holds them
    (allenai/OLMo's `q_norm` / `k_norm`)."""

    def __init__(self, n_heads: int, n_kv_heads: int, eps: float = 1e-6, theta: float = 10000.0,
                 rope_scaling: RopeScaling | None = None, backend: str | None = None) -> None:
        super().__init__(backend)
        self.n_heads, self.n_kv_heads, self.eps = n_heads, n_kv_heads, eps
        self.theta, self.rope_scaling = theta, rope_scaling

    def forward(self, qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                positions: torch.Tensor | None = None, offset: int | torch.Tensor = 0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return ops.qk_norm_rope(qkv, q_weight, k_weight, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                                eps=self.eps, positions=positions, offset=offset, theta=self.theta,
                                rope_scaling=self.rope_scaling, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, eps={self.eps}, theta={self.theta}, "
                f"rope_scaling={self.rope_scaling}, backend={self.backend}")
