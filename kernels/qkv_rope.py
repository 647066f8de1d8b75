"""The attention prologue in one kernel: the fused projection output `[B, T, (Hq + 2 Hkv) D]` -> clamp to
±clip (OLMo 1.7; exactly torch.clamp, see `_clamp.py`) -> split Q | K | V -> RoPE (NeoX) on q and k ->
q `[B, T, Hq, D]`, k, v `[B, T, Hkv, D]`.

Backward: dqkv from (dq, dk, dv) (any strides): the inverse rotation on dq and dk, then the clamp's gradient,
which passes where -clip <= x <= clip (inclusive, as torch.clamp's; NaN blocks it) - so it reads the saved
qkv input. One program per token; the rotation math is kernels/rope.py's.
Bytes per element (E = element size): forward reads E, writes E; backward reads 2E with clip (E without),
writes E.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._clamp import clamp, clamp_grad, clip_bound
from ._launch import num_warps, to_dtype
from .rope import head_tiles, inv_freq, pair_offsets, position_args, rope_cos_sin, rotate, token_position


@triton.jit
def _fwd_heads(SRC, DST, n_heads, HALF, cos, sin, clip, CLIP: tl.constexpr, ROTATE: tl.constexpr,
               BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """One token's `n_heads` contiguous heads at SRC -> DST (contiguous): clamp, then rotate."""
    pair = tl.arange(0, BLOCK_HALF)
    i1, i2 = pair_offsets(pair, HALF, False)
    for h0 in range(0, n_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        mask = (heads < n_heads)[:, None] & (pair < HALF)[None, :]
        offs = heads[:, None] * (2 * HALF)
        x1 = tl.load(SRC + offs + i1[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(SRC + offs + i2[None, :], mask=mask, other=0.0).to(tl.float32)
        x1 = clamp(x1, clip, CLIP)
        x2 = clamp(x2, clip, CLIP)
        if ROTATE:
            x1, x2 = rotate(x1, x2, cos[None, :], sin[None, :], False)
        tl.store(DST + offs + i1[None, :], to_dtype(x1, DST.dtype.element_ty), mask=mask)
        tl.store(DST + offs + i2[None, :], to_dtype(x2, DST.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_heads(GRAD, stride_h, stride_d, SRC, DST, n_heads, HALF, cos, sin, clip, CLIP: tl.constexpr,
               ROTATE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """One token's head gradients (strided) -> rotated back, zeroed where the forward clamped SRC -> DST."""
    pair = tl.arange(0, BLOCK_HALF)
    i1, i2 = pair_offsets(pair, HALF, False)
    for h0 in range(0, n_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        mask = (heads < n_heads)[:, None] & (pair < HALF)[None, :]
        grad = GRAD + heads[:, None].to(tl.int64) * stride_h  # gradients may be head-major: large strides
        g1 = tl.load(grad + i1[None, :].to(tl.int64) * stride_d, mask=mask, other=0.0).to(tl.float32)
        g2 = tl.load(grad + i2[None, :].to(tl.int64) * stride_d, mask=mask, other=0.0).to(tl.float32)
        if ROTATE:
            g1, g2 = rotate(g1, g2, cos[None, :], sin[None, :], True)
        offs = heads[:, None] * (2 * HALF)
        if CLIP:
            x1 = tl.load(SRC + offs + i1[None, :], mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(SRC + offs + i2[None, :], mask=mask, other=0.0).to(tl.float32)
            g1 = clamp_grad(g1, x1, clip, CLIP)
            g2 = clamp_grad(g2, x2, clip, CLIP)
        tl.store(DST + offs + i1[None, :], to_dtype(g1, DST.dtype.element_ty), mask=mask)
        tl.store(DST + offs + i2[None, :], to_dtype(g2, DST.dtype.element_ty), mask=mask)


@triton.jit
def _qkv_rope_fwd_kernel(QKV, Q, K, V, POS, INV_FREQ, T, HQ, HKV, HALF, offset, stride_b, stride_t, stride_pb,
                         clip, HAS_POS: tl.constexpr, CLIP: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_HALF: tl.constexpr):
    bt = tl.program_id(0).to(tl.int64)
    b, t = bt // T, bt % T
    cos, sin = rope_cos_sin(token_position(POS, stride_pb, b, t, offset, HAS_POS), INV_FREQ,
                            tl.arange(0, BLOCK_HALF), HALF)
    D = 2 * HALF
    src = QKV + b * stride_b + t * stride_t
    _fwd_heads(src, Q + bt * HQ * D, HQ, HALF, cos, sin, clip, CLIP, True, BLOCK_H, BLOCK_HALF)
    _fwd_heads(src + HQ * D, K + bt * HKV * D, HKV, HALF, cos, sin, clip, CLIP, True, BLOCK_H, BLOCK_HALF)
    _fwd_heads(src + (HQ + HKV) * D, V + bt * HKV * D, HKV, HALF, cos, sin, clip, CLIP, False, BLOCK_H, BLOCK_HALF)


@triton.jit
def _qkv_rope_bwd_kernel(DQ, DK, DV, QKV, DQKV, POS, INV_FREQ, T, HQ, HKV, HALF, offset,
                         dq_b, dq_t, dq_h, dq_d, dk_b, dk_t, dk_h, dk_d, dv_b, dv_t, dv_h, dv_d,
                         stride_b, stride_t, stride_pb, clip, HAS_POS: tl.constexpr, CLIP: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    bt = tl.program_id(0).to(tl.int64)
    b, t = bt // T, bt % T
    cos, sin = rope_cos_sin(token_position(POS, stride_pb, b, t, offset, HAS_POS), INV_FREQ,
                            tl.arange(0, BLOCK_HALF), HALF)
    D = 2 * HALF
    src = QKV + b * stride_b + t * stride_t
    dst = DQKV + bt * (HQ + 2 * HKV) * D
    _bwd_heads(DQ + b * dq_b + t * dq_t, dq_h, dq_d, src, dst, HQ, HALF, cos, sin, clip, CLIP, True,
               BLOCK_H, BLOCK_HALF)
    _bwd_heads(DK + b * dk_b + t * dk_t, dk_h, dk_d, src + HQ * D, dst + HQ * D, HKV, HALF, cos, sin, clip, CLIP,
               True, BLOCK_H, BLOCK_HALF)
    _bwd_heads(DV + b * dv_b + t * dv_t, dv_h, dv_d, src + (HQ + HKV) * D, dst + (HQ + HKV) * D, HKV, HALF, cos,
               sin, clip, CLIP, False, BLOCK_H, BLOCK_HALF)


def qkv_rope_fwd(qkv: torch.Tensor, n_heads: int, n_kv_heads: int, clip: float | None,
                 positions: torch.Tensor | None, offset: int, theta: float):
    """qkv `[B, T, (Hq + 2 Hkv) D]` (unit last stride) -> (q `[B, T, Hq, D]`, k, v `[B, T, Hkv, D]`), contiguous."""
    B, T, width = qkv.shape
    D = width // (n_heads + 2 * n_kv_heads)
    pos, stride_pb = position_args(positions, T, qkv.device)
    block_h, block_half = head_tiles(max(n_heads, n_kv_heads), D // 2)
    q = torch.empty((B, T, n_heads, D), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((B, T, n_kv_heads, D), dtype=qkv.dtype, device=qkv.device)
    v = torch.empty_like(k)
    if qkv.numel():
        _qkv_rope_fwd_kernel[(B * T,)](
            qkv, q, k, v, qkv if pos is None else pos, inv_freq(D, float(theta), qkv.device), T, n_heads,
            n_kv_heads, D // 2, offset, qkv.stride(0), qkv.stride(1), stride_pb, clip_bound(clip, qkv.dtype),
            HAS_POS=pos is not None, CLIP=clip is not None, BLOCK_H=block_h, BLOCK_HALF=block_half,
            num_warps=num_warps(2 * block_h * block_half))
    return q, k, v


def qkv_rope_bwd(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, qkv: torch.Tensor | None,
                 clip: float | None, positions: torch.Tensor | None, offset: int, theta: float) -> torch.Tensor:
    """(dq `[B, T, Hq, D]`, dk, dv `[B, T, Hkv, D]`, any strides) -> dqkv `[B, T, (Hq + 2 Hkv) D]` contiguous.
    `qkv` (the forward's input; unit last stride) is read only with `clip`, and may be None without it."""
    B, T, n_heads, D = dq.shape
    n_kv_heads = dk.shape[2]
    if clip is not None and qkv is None:
        raise ValueError("qkv_rope_bwd needs the forward's qkv input to apply the clip's gradient")
    pos, stride_pb = position_args(positions, T, dq.device)
    block_h, block_half = head_tiles(max(n_heads, n_kv_heads), D // 2)
    dqkv = torch.empty((B, T, (n_heads + 2 * n_kv_heads) * D), dtype=dq.dtype, device=dq.device)
    src = dqkv if qkv is None else qkv
    if dqkv.numel():
        _qkv_rope_bwd_kernel[(B * T,)](
            dq, dk, dv, src, dqkv, dq if pos is None else pos, inv_freq(D, float(theta), dq.device), T,
            n_heads, n_kv_heads, D // 2, offset, *dq.stride(), *dk.stride(), *dv.stride(), src.stride(0),
            src.stride(1), stride_pb, clip_bound(clip, src.dtype), HAS_POS=pos is not None,
            CLIP=clip is not None, BLOCK_H=block_h, BLOCK_HALF=block_half,
            num_warps=num_warps(2 * block_h * block_half))
    return dqkv


KERNELS = {"qkv_rope_fwd": qkv_rope_fwd, "qkv_rope_bwd": qkv_rope_bwd}
