"""The op `qk_norm_rope`, OLMo 2/3's attention prologue (split -> RMSNorm over all of q and of k -> RoPE):
validation, dispatch, and the custom ops "olmo_fast::qk_norm_rope_fwd" / "_bwd" with autograd, running the kernels
of the same names:

  "qk_norm_rope_fwd"(qkv, q_weight, k_weight, n_heads, n_kv_heads, eps, positions | None, offset, inv_freq,
                     attention_factor) -> (q, k, v, rstd)
      q [B, T, Hq, D], k, v [B, T, Hkv, D] contiguous in qkv's dtype; rstd [B * T, 2] fp32 (q's, k's per token)
  "qk_norm_rope_bwd"(dq, dk, dv, qkv, q_weight, k_weight, rstd, positions | None, offset, inv_freq,
                     attention_factor) -> (dqkv [B, T, (Hq + 2 Hkv) D], dq_weight fp32, dk_weight fp32)

`inv_freq` ([D / 2] fp32) and `attention_factor` are the RoPE frequencies and cos/sin factor of
`olmo_fast.rope_scaling.rope_frequencies`; weights reach the kernels contiguous. The backward keeps the qkv input,
the rstd and the weights. Triton kernels: kernels/qk_norm_rope.py (one program per token row: the norm spans every
head); C++: csrc/cpu/qk_norm_rope.cpp.
"""
from __future__ import annotations

import functools

import torch

from ..rope_scaling import RopeScaling, rope_frequencies
from . import dispatch, reference
from ._library import check_like, check_positions, custom_op, kernel


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
    if positions is None and isinstance(offset, torch.Tensor):
        positions, offset = reference.rope_positions(qkv.shape[1], offset, qkv.device), 0
    inv_freq, factor = _frequencies(head_dim, float(theta), rope_scaling, qkv.device)
    q, k, v, _ = _fwd(qkv, q_weight, k_weight, n_heads, n_kv_heads, float(eps), positions, int(offset), inv_freq,
                      factor, chosen)
    return q, k, v


def _frequencies(head_dim: int, theta: float, scaling: RopeScaling | None, device: torch.device
                 ) -> tuple[torch.Tensor, float]:
    """One fp32 inverse-frequency table per (head dim, theta, scaling, device) in eager mode: no per-call device
    work; under torch.compile traced into the graph (dynamo would bypass the cache, with a warning)."""
    if torch.compiler.is_compiling():
        return rope_frequencies(head_dim, theta, scaling, device)
    return _cached_frequencies(head_dim, theta, scaling, device)


_cached_frequencies = functools.lru_cache(maxsize=64)(rope_frequencies)


@custom_op("olmo_fast::qk_norm_rope_fwd")
def _fwd(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, n_heads: int, n_kv_heads: int, eps: float,
         positions: torch.Tensor | None, offset: int, inv_freq: torch.Tensor, attention_factor: float, backend: str
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    return kernel("qk_norm_rope_fwd", backend, qkv)(qkv, q_weight.contiguous(), k_weight.contiguous(), n_heads,
                                                    n_kv_heads, eps, positions, offset, inv_freq, attention_factor)


@_fwd.register_fake
def _(qkv, q_weight, k_weight, n_heads, n_kv_heads, eps, positions, offset, inv_freq, attention_factor, backend):
    B, T, width = qkv.shape
    D = width // (n_heads + 2 * n_kv_heads)
    kv = qkv.new_empty((B, T, n_kv_heads, D))
    return (qkv.new_empty((B, T, n_heads, D)), kv, kv.new_empty(kv.shape),
            qkv.new_empty((B * T, 2), dtype=torch.float32))


@custom_op("olmo_fast::qk_norm_rope_bwd")
def _bwd(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, qkv: torch.Tensor, q_weight: torch.Tensor,
         k_weight: torch.Tensor, rstd: torch.Tensor, positions: torch.Tensor | None, offset: int,
         inv_freq: torch.Tensor, attention_factor: float, backend: str
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    return kernel("qk_norm_rope_bwd", backend, dq)(dq, dk, dv, qkv, q_weight.contiguous(), k_weight.contiguous(),
                                                   rstd, positions, offset, inv_freq, attention_factor)


@_bwd.register_fake
def _(dq, dk, dv, qkv, q_weight, k_weight, rstd, positions, offset, inv_freq, attention_factor, backend):
    return (qkv.new_empty(qkv.shape), rstd.new_empty(q_weight.shape), rstd.new_empty(k_weight.shape))


def _setup(ctx, inputs, output) -> None:
    qkv, q_weight, k_weight, _, _, _, positions, ctx.offset, inv_freq, ctx.factor, ctx.backend = inputs
    ctx.save_for_backward(qkv, q_weight, k_weight, output[3], positions, inv_freq)
    ctx.weight_dtypes = (q_weight.dtype, k_weight.dtype)
    ctx.mark_non_differentiable(output[3])


def _backward(ctx, dq, dk, dv, _drstd):
    qkv, q_weight, k_weight, rstd, positions, inv_freq = ctx.saved_tensors
    dqkv, dqw, dkw = _bwd(dq, dk, dv, qkv, q_weight, k_weight, rstd, positions, ctx.offset, inv_freq, ctx.factor,
                          ctx.backend)
    return (dqkv, dqw.to(ctx.weight_dtypes[0]), dkw.to(ctx.weight_dtypes[1]), None, None, None, None, None, None, None,
            None)


_fwd.register_autograd(_backward, setup_context=_setup)
