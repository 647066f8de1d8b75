"""The op `qkv_rope`, the attention prologue (clamp -> split -> RoPE): validation, dispatch, and the custom ops
"olmo_fast::qkv_rope_fwd" / "_bwd" with autograd, running the kernels of the same names (signatures:
kernels/qkv_rope.py). The backward keeps the qkv input only when clipping (for the clamp's gradient); without a
clip it keeps nothing but the positions.
"""
from __future__ import annotations

import torch

from . import dispatch, reference
from ._library import check_positions, custom_op, kernel


def qkv_rope(qkv: torch.Tensor, *, n_heads: int, n_kv_heads: int, clip: float | None = None,
             positions: torch.Tensor | None = None, offset: int | torch.Tensor = 0, theta: float = 10000.0,
             backend: str | None = None):
    """Attention prologue: `[B, T, (Hq + 2 Hkv) D]` -> clamp to ±clip (`reference.clip_qkv`) -> split Q|K|V ->
    RoPE on q, k.

    Returns `(q, k, v)` in `[B, T, H, D]`.
    """
    heads = n_heads + 2 * n_kv_heads
    if qkv.dim() != 3 or qkv.shape[-1] % heads:
        raise ValueError(f"qkv_rope wants [B, T, (Hq + 2 Hkv) * D], got {tuple(qkv.shape)} "
                         f"for {n_heads} query and {n_kv_heads} key/value heads")
    if (qkv.shape[-1] // heads) % 2:
        raise ValueError(f"qkv_rope needs an even head dim, got {qkv.shape[-1] // heads}")
    check_positions(positions, qkv.shape[0], qkv.shape[1])
    chosen = dispatch.resolve("qkv_rope_fwd", backend, qkv.device)
    if chosen == "torch":
        return reference.qkv_rope(qkv, n_heads, n_kv_heads, clip, positions, offset, theta)
    if positions is None and isinstance(offset, torch.Tensor):
        positions, offset = reference.rope_positions(qkv.shape[1], offset, qkv.device), 0
    return _fwd(qkv, n_heads, n_kv_heads, None if clip is None else float(clip), positions, int(offset),
                float(theta), chosen)


@custom_op("olmo_fast::qkv_rope_fwd")
def _fwd(qkv: torch.Tensor, n_heads: int, n_kv_heads: int, clip: float | None, positions: torch.Tensor | None,
         offset: int, theta: float, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    return kernel("qkv_rope_fwd", backend, qkv)(qkv, n_heads, n_kv_heads, clip, positions, offset, theta)


@_fwd.register_fake
def _(qkv, n_heads, n_kv_heads, clip, positions, offset, theta, backend):
    B, T, width = qkv.shape
    D = width // (n_heads + 2 * n_kv_heads)
    return qkv.new_empty(B, T, n_heads, D), qkv.new_empty(B, T, n_kv_heads, D), qkv.new_empty(B, T, n_kv_heads, D)


@custom_op("olmo_fast::qkv_rope_bwd")
def _bwd(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, qkv: torch.Tensor | None, clip: float | None,
         positions: torch.Tensor | None, offset: int, theta: float, backend: str) -> torch.Tensor:
    if qkv is not None and qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    return kernel("qkv_rope_bwd", backend, dq)(dq, dk, dv, qkv, clip, positions, offset, theta)


@_bwd.register_fake
def _(dq, dk, dv, qkv, clip, positions, offset, theta, backend):
    B, T, n_heads, D = dq.shape
    return dq.new_empty(B, T, (n_heads + 2 * dk.shape[2]) * D)


def _setup(ctx, inputs, output) -> None:
    qkv, _, _, clip, positions, ctx.offset, ctx.theta, ctx.backend = inputs
    ctx.clip = clip
    ctx.save_for_backward(qkv if clip is not None else None, positions)


def _backward(ctx, dq, dk, dv):
    qkv, positions = ctx.saved_tensors
    dqkv = _bwd(dq, dk, dv, qkv, ctx.clip, positions, ctx.offset, ctx.theta, ctx.backend)
    return dqkv, None, None, None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup)
