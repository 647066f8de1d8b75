"""The op `qk_norm_rope`, OLMo 2/3's attention prologue (split -> RMSNorm over all of q and of k -> RoPE):
validation and dispatch. The compiled kernels "qk_norm_rope_fwd" / "qk_norm_rope_bwd" run one program per token
row (the norm spans every head); until a backend provides them the op runs `reference.qk_norm_rope`.
"""
from __future__ import annotations

import torch

from ..rope_scaling import RopeScaling
from . import dispatch, reference
from ._library import check_like, check_positions


def qk_norm_rope(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, *, n_heads: int, n_kv_heads: int,
                 eps: float = 1e-6, positions: torch.Tensor | None = None, offset: int | torch.Tensor = 0,
                 theta: float = 10000.0, rope_scaling: RopeScaling | None = None, backend: str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OLMo 2's prologue: the fused projection `[B, T, (Hq + 2 Hkv) D]` -> split Q|K|V -> RMSNorm of q over its
    `Hq D` dims (weight `q_weight`) and of k over its `Hkv D` dims (`k_weight`), fp32 statistics and weight
    product -> RoPE (NeoX) on q and k with `theta` and `rope_scaling` (`olmo_fast.rope_scaling`).

    Positions: `positions` (`[T]` or `[B, T]`) or `offset + arange(T)` (`offset` an int or `[B]`).
    Returns `(q, k, v)` in `[B, T, H, D]`, qkv's dtype.
    """
    heads = n_heads + 2 * n_kv_heads
    if qkv.dim() != 3 or n_heads < 1 or n_kv_heads < 1 or qkv.shape[-1] % heads:
        raise ValueError(f"qk_norm_rope wants [B, T, (Hq + 2 Hkv) * D], got {tuple(qkv.shape)} "
                         f"for {n_heads} query and {n_kv_heads} key/value heads")
    head_dim = qkv.shape[-1] // heads
    if head_dim % 2:
        raise ValueError(f"qk_norm_rope needs an even head dim, got {head_dim}")
    check_like("q_weight", q_weight, qkv, (n_heads * head_dim,))
    check_like("k_weight", k_weight, qkv, (n_kv_heads * head_dim,))
    check_positions(positions, qkv.shape[0], qkv.shape[1])
    chosen = dispatch.resolve("qk_norm_rope_fwd", backend, qkv.device)
    if chosen == "torch":
        return reference.qk_norm_rope(qkv, q_weight, k_weight, n_heads, n_kv_heads, eps, positions, offset, theta,
                                      rope_scaling)
    raise dispatch.BackendError(f"qk_norm_rope: backend {chosen!r} has no custom op wired yet")
