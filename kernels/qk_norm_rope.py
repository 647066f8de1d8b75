"""OLMo 2/3's attention prologue in one kernel: the fused projection output `[B, T, (Hq + 2 Hkv) D]` -> split
Q | K | V -> RMSNorm over the whole q part (Hq * D wide, weight wq) and the whole k part (Hkv * D, weight wk) ->
RoPE (NeoX rotate-half) on q and k -> q `[B, T, Hq, D]`, k, v `[B, T, Hkv, D]`.

Forward, per token row and part x of C = H * D elements (fp32 throughout, cast once at the store):
    rstd = 1 / sqrt(mean(x^2) + eps),  y = w * (x * rstd)      (OLMo 2's RMSNorm: the weight multiplies in fp32)
    out = a * R(pos * inv_freq) y                               (pair (y1, y2) -> (y1 cos - y2 sin, y2 cos + y1 sin))
with `inv_freq` `[D/2]` fp32 and the attention factor `a` (yarn's; 1 otherwise) given by the caller, as
transformers scales cos and sin. v is copied. rstd of both parts is saved (fp32 `[B T, 2]`) for the backward.
Backward, per row and part, from the output gradient dout (any strides):
    dy = a * R(-angle) dout,  g = w * dy,  xhat = x * rstd,
    dx = rstd * (g - xhat * mean(g * xhat)),  dw = sum over rows of dy * xhat   (fp32),
dv copied into dqkv's V part. Weight gradients: persistent programs accumulate fp32 partial rows (in registers when
a part fits one tile, else in their own row of a partial buffer), summed on the host, as kernels/layer_norm.py
does; its `_store_dx` writes dx. The rotation math is kernels/rope.py's, the V copies kernels/qkv_rope.py's.
Each part is held in one tile, one pass over the row, when the wider part's padded size (next_pow2(H) *
next_pow2(D)) is at most SINGLE_PASS_TILE elements (OLMo 2/3 1B-32B: parts of 2048-5120); wider parts take two
passes over the row in chunks of heads (sum of squares, then normalise), the second from cache.

Bytes per element (E = element size): forward reads E and writes E (+8 B rstd per row); backward reads 2E for q/k
(gradient, saved input) and E for v, writes E; weights are read per row (cached), partial weight gradients add
8 B per element per program (single pass) or per row (two-pass parts, cached).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import next_pow2, num_warps, persistent_programs, to_dtype
from .layer_norm import _store_dx
from .qkv_rope import _bwd_heads, _fwd_heads
from .rope import pair_offsets, position_args, rope_cos_sin, rotate, token_position

SINGLE_PASS_TILE = 8192  # elements of a part held in registers for one pass; wider parts loop over head chunks


@triton.jit
def _chunk(h0, n_heads, HALF, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Heads h0 .. h0 + BLOCK_H of a part: (heads [BLOCK_H, 1], the pair members' dims i1, i2 [1, BLOCK_HALF],
    mask [BLOCK_H, BLOCK_HALF])."""
    heads = h0 + tl.arange(0, BLOCK_H)
    pair = tl.arange(0, BLOCK_HALF)
    i1, i2 = pair_offsets(pair, HALF, False)
    return heads[:, None], i1[None, :], i2[None, :], (heads < n_heads)[:, None] & (pair < HALF)[None, :]


@triton.jit
def _load_pairs(P, heads, i1, i2, stride_h, stride_d, mask):
    """Both members of each pair in fp32, element (h, d) at P + h * stride_h + d * stride_d."""
    rows = P + heads * stride_h
    return (tl.load(rows + i1 * stride_d, mask=mask, other=0.0).to(tl.float32),
            tl.load(rows + i2 * stride_d, mask=mask, other=0.0).to(tl.float32))


@triton.jit
def _store_pairs(P, heads, i1, i2, D, x1, x2, mask):
    """Both members of each pair into the contiguous part P (head stride D)."""
    tl.store(P + heads * D + i1, x1, mask=mask)
    tl.store(P + heads * D + i2, x2, mask=mask)


@triton.jit
def _sum_squares(x1, x2):
    return tl.sum(x1 * x1) + tl.sum(x2 * x2)


@triton.jit
def _rstd(sum_squares, width, eps):
    return 1.0 / tl.sqrt(sum_squares / width + eps)


@triton.jit
def _norm_rotate_store(DST, W, x1, x2, heads, i1, i2, mask, rstd, cos, sin, D):
    """y = w * (x * rstd), rotated, stored to the contiguous part DST."""
    w1, w2 = _load_pairs(W, heads, i1, i2, D, 1, mask)
    y1, y2 = rotate(w1 * (x1 * rstd), w2 * (x2 * rstd), cos[None, :], sin[None, :], False)
    out = DST.dtype.element_ty
    _store_pairs(DST, heads, i1, i2, D, to_dtype(y1, out), to_dtype(y2, out), mask)


@triton.jit
def _norm_rope_fwd(SRC, DST, W, n_heads, HALF, cos, sin, eps, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                   SINGLE_PASS: tl.constexpr):
    """One row's part of `n_heads` contiguous heads at SRC -> normalised, rotated, at DST; returns its rstd."""
    D = 2 * HALF
    if SINGLE_PASS:
        heads, i1, i2, mask = _chunk(0, n_heads, HALF, BLOCK_H, BLOCK_HALF)
        x1, x2 = _load_pairs(SRC, heads, i1, i2, D, 1, mask)
        rstd = _rstd(_sum_squares(x1, x2), n_heads * D, eps)
        _norm_rotate_store(DST, W, x1, x2, heads, i1, i2, mask, rstd, cos, sin, D)
    else:
        total = tl.zeros([], dtype=tl.float32)
        for h0 in range(0, n_heads, BLOCK_H):
            heads, i1, i2, mask = _chunk(h0, n_heads, HALF, BLOCK_H, BLOCK_HALF)
            x1, x2 = _load_pairs(SRC, heads, i1, i2, D, 1, mask)
            total += _sum_squares(x1, x2)
        rstd = _rstd(total, n_heads * D, eps)
        for h0 in range(0, n_heads, BLOCK_H):
            heads, i1, i2, mask = _chunk(h0, n_heads, HALF, BLOCK_H, BLOCK_HALF)
            x1, x2 = _load_pairs(SRC, heads, i1, i2, D, 1, mask)
            _norm_rotate_store(DST, W, x1, x2, heads, i1, i2, mask, rstd, cos, sin, D)
    return rstd


@triton.jit
def _row_cos_sin(POS, INV_FREQ, stride_pb, b, t, offset, HALF, attention_factor, HAS_POS: tl.constexpr,
                 BLOCK_HALF: tl.constexpr):
    """The row's cos and sin `[BLOCK_HALF]`, times the attention factor (as transformers scales them)."""
    cos, sin = rope_cos_sin(token_position(POS, stride_pb, b, t, offset, HAS_POS), INV_FREQ,
                            tl.arange(0, BLOCK_HALF), HALF)
    return cos * attention_factor, sin * attention_factor


@triton.jit
def _qk_norm_rope_fwd_kernel(QKV, WQ, WK, Q, K, V, RSTD, POS, INV_FREQ, T, HQ, HKV, HALF, offset, stride_b,
                             stride_t, stride_pb, eps, attention_factor, HAS_POS: tl.constexpr,
                             BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr,
                             SINGLE_PASS: tl.constexpr):
    bt = tl.program_id(0).to(tl.int64)
    b, t = bt // T, bt % T
    cos, sin = _row_cos_sin(POS, INV_FREQ, stride_pb, b, t, offset, HALF, attention_factor, HAS_POS, BLOCK_HALF)
    D = 2 * HALF
    src = QKV + b * stride_b + t * stride_t
    rstd_q = _norm_rope_fwd(src, Q + bt * HQ * D, WQ, HQ, HALF, cos, sin, eps, BLOCK_HQ, BLOCK_HALF,
                            SINGLE_PASS)
    rstd_k = _norm_rope_fwd(src + HQ * D, K + bt * HKV * D, WK, HKV, HALF, cos, sin, eps, BLOCK_HKV, BLOCK_HALF,
                            SINGLE_PASS)
    _fwd_heads(src + (HQ + HKV) * D, V + bt * HKV * D, HKV, HALF, cos, sin, 0.0, False, False, BLOCK_HKV,
               BLOCK_HALF)
    tl.store(RSTD + 2 * bt, rstd_q)
    tl.store(RSTD + 2 * bt + 1, rstd_k)


@triton.jit
def _grad_terms(GRAD, stride_h, stride_d, SRC, W, h0, n_heads, HALF, cos, sin, rstd, BLOCK_H: tl.constexpr,
                BLOCK_HALF: tl.constexpr):
    """One chunk of heads of a part: (heads, i1, i2, mask, and per pair member the fp32 gradient of the normed
    part dy (dout rotated back), g = w * dy and xhat = x * rstd)."""
    D = 2 * HALF
    heads, i1, i2, mask = _chunk(h0, n_heads, HALF, BLOCK_H, BLOCK_HALF)
    d1, d2 = _load_pairs(GRAD, heads.to(tl.int64), i1.to(tl.int64), i2.to(tl.int64), stride_h, stride_d, mask)
    d1, d2 = rotate(d1, d2, cos[None, :], sin[None, :], True)
    x1, x2 = _load_pairs(SRC, heads, i1, i2, D, 1, mask)
    w1, w2 = _load_pairs(W, heads, i1, i2, D, 1, mask)
    return heads, i1, i2, mask, d1, d2, w1 * d1, w2 * d2, x1 * rstd, x2 * rstd


@triton.jit
def _norm_rope_bwd_single_pass(GRAD, stride_h, stride_d, SRC, DST, W, n_heads, HALF, cos, sin, rstd, acc1, acc2,
                               BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """One row's part held in one tile: dx -> DST; returns the weight-gradient accumulators plus dy * xhat."""
    heads, i1, i2, mask, d1, d2, g1, g2, xh1, xh2 = _grad_terms(GRAD, stride_h, stride_d, SRC, W, 0, n_heads, HALF,
                                                                cos, sin, rstd, BLOCK_H, BLOCK_HALF)
    c_xhat = (tl.sum(g1 * xh1) + tl.sum(g2 * xh2)) / (n_heads * 2 * HALF)
    dst = DST + heads * (2 * HALF)
    _store_dx(dst, dst, g1, xh1, c_xhat, 0.0, rstd, i1, mask, False)
    _store_dx(dst, dst, g2, xh2, c_xhat, 0.0, rstd, i2, mask, False)
    return acc1 + d1 * xh1, acc2 + d2 * xh2


@triton.jit
def _norm_rope_bwd_looped(GRAD, stride_h, stride_d, SRC, DST, W, DW, n_heads, HALF, cos, sin, rstd,
                          BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """One row's part in head chunks: mean(g * xhat) first, then dx -> DST and dy * xhat added to DW (this
    program's fp32 partial row of the part's weight gradient)."""
    c_xhat = tl.zeros([], dtype=tl.float32)
    for h0 in range(0, n_heads, BLOCK_H):
        _, _, _, _, _, _, g1, g2, xh1, xh2 = _grad_terms(GRAD, stride_h, stride_d, SRC, W, h0, n_heads, HALF, cos,
                                                         sin, rstd, BLOCK_H, BLOCK_HALF)
        c_xhat += tl.sum(g1 * xh1) + tl.sum(g2 * xh2)
    c_xhat = c_xhat / (n_heads * 2 * HALF)
    for h0 in range(0, n_heads, BLOCK_H):
        heads, i1, i2, mask, d1, d2, g1, g2, xh1, xh2 = _grad_terms(GRAD, stride_h, stride_d, SRC, W, h0, n_heads,
                                                                    HALF, cos, sin, rstd, BLOCK_H, BLOCK_HALF)
        dst = DST + heads * (2 * HALF)
        _store_dx(dst, dst, g1, xh1, c_xhat, 0.0, rstd, i1, mask, False)
        _store_dx(dst, dst, g2, xh2, c_xhat, 0.0, rstd, i2, mask, False)
        dw = DW + heads * (2 * HALF)
        tl.store(dw + i1, tl.load(dw + i1, mask=mask) + d1 * xh1, mask=mask)
        tl.store(dw + i2, tl.load(dw + i2, mask=mask) + d2 * xh2, mask=mask)


@triton.jit
def _qk_norm_rope_bwd_kernel(DQ, DK, DV, QKV, WQ, WK, RSTD, DQKV, DW, POS, INV_FREQ, N, T, HQ, HKV, HALF, offset,
                             dq_b, dq_t, dq_h, dq_d, dk_b, dk_t, dk_h, dk_d, dv_b, dv_t, dv_h, dv_d,
                             stride_b, stride_t, stride_pb, attention_factor, HAS_POS: tl.constexpr,
                             BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr,
                             SINGLE_PASS: tl.constexpr):
    """Rows pid, pid + P, ...; DW is this program's fp32 partial row `[(HQ + HKV) D]` of both weight gradients
    (zeroed beforehand when not SINGLE_PASS)."""
    pid = tl.program_id(0).to(tl.int64)  # int64 rows: the loop variable takes the bounds' type
    programs = tl.num_programs(0)
    D = 2 * HALF
    DW += pid * (HQ + HKV) * D
    if SINGLE_PASS:
        acc_q1 = tl.zeros([BLOCK_HQ, BLOCK_HALF], dtype=tl.float32)
        acc_q2 = tl.zeros([BLOCK_HQ, BLOCK_HALF], dtype=tl.float32)
        acc_k1 = tl.zeros([BLOCK_HKV, BLOCK_HALF], dtype=tl.float32)
        acc_k2 = tl.zeros([BLOCK_HKV, BLOCK_HALF], dtype=tl.float32)
    for row in range(pid, N, programs):
        b, t = row // T, row % T
        cos, sin = _row_cos_sin(POS, INV_FREQ, stride_pb, b, t, offset, HALF, attention_factor, HAS_POS,
                                BLOCK_HALF)
        src = QKV + b * stride_b + t * stride_t
        dst = DQKV + row * (HQ + 2 * HKV) * D
        dq, dk = DQ + b * dq_b + t * dq_t, DK + b * dk_b + t * dk_t
        rstd_q, rstd_k = tl.load(RSTD + 2 * row), tl.load(RSTD + 2 * row + 1)
        if SINGLE_PASS:
            acc_q1, acc_q2 = _norm_rope_bwd_single_pass(dq, dq_h, dq_d, src, dst, WQ, HQ, HALF, cos, sin, rstd_q,
                                                        acc_q1, acc_q2, BLOCK_HQ, BLOCK_HALF)
            acc_k1, acc_k2 = _norm_rope_bwd_single_pass(dk, dk_h, dk_d, src + HQ * D, dst + HQ * D, WK, HKV, HALF,
                                                        cos, sin, rstd_k, acc_k1, acc_k2, BLOCK_HKV, BLOCK_HALF)
        else:
            _norm_rope_bwd_looped(dq, dq_h, dq_d, src, dst, WQ, DW, HQ, HALF, cos, sin, rstd_q, BLOCK_HQ, BLOCK_HALF)
            _norm_rope_bwd_looped(dk, dk_h, dk_d, src + HQ * D, dst + HQ * D, WK, DW + HQ * D, HKV, HALF, cos, sin,
                                  rstd_k, BLOCK_HKV, BLOCK_HALF)
        _bwd_heads(DV + b * dv_b + t * dv_t, dv_h, dv_d, src, dst + (HQ + HKV) * D, HKV, HALF, cos, sin, 0.0, False,
                   False, BLOCK_HKV, BLOCK_HALF)
    if SINGLE_PASS:
        heads, i1, i2, mask = _chunk(0, HQ, HALF, BLOCK_HQ, BLOCK_HALF)
        _store_pairs(DW, heads, i1, i2, D, acc_q1, acc_q2, mask)
        heads, i1, i2, mask = _chunk(0, HKV, HALF, BLOCK_HKV, BLOCK_HALF)
        _store_pairs(DW + HQ * D, heads, i1, i2, D, acc_k1, acc_k2, mask)


def part_tiles(n_heads: int, n_kv_heads: int, head_dim: int) -> tuple[int, int, int, bool]:
    """(BLOCK_HQ, BLOCK_HKV, BLOCK_HALF, SINGLE_PASS): heads per tile of the q part and of the k (and v) part.
    Each part is held in one tile when the wider one fits SINGLE_PASS_TILE elements (SINGLE_PASS), else both go in
    chunks of as many heads as fit."""
    block_half = next_pow2(head_dim // 2)
    fit = max(1, SINGLE_PASS_TILE // (2 * block_half))  # a power of two
    block_hq, block_hkv = min(next_pow2(n_heads), fit), min(next_pow2(n_kv_heads), fit)
    return block_hq, block_hkv, block_half, next_pow2(max(n_heads, n_kv_heads)) <= fit


def _checked_geometry(width: int, n_heads: int, n_kv_heads: int, inv_freq: torch.Tensor) -> int:
    D = width // (n_heads + 2 * n_kv_heads)
    if inv_freq.shape != (D // 2,) or inv_freq.dtype != torch.float32:
        raise ValueError(f"inv_freq must be fp32 [{D // 2}], got {inv_freq.dtype} {tuple(inv_freq.shape)}")
    return D


def qk_norm_rope_fwd(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, n_heads: int,
                     n_kv_heads: int, eps: float, positions: torch.Tensor | None, offset: int,
                     inv_freq: torch.Tensor, attention_factor: float):
    """qkv `[B, T, (Hq + 2 Hkv) D]` (unit last stride), q_weight `[Hq D]`, k_weight `[Hkv D]` (contiguous),
    inv_freq `[D/2]` fp32 -> (q `[B, T, Hq, D]`, k, v `[B, T, Hkv, D]` contiguous in qkv's dtype,
    rstd `[B T, 2]` fp32: each token's q and k parts' 1/sqrt(mean(x^2) + eps))."""
    B, T, width = qkv.shape
    D = _checked_geometry(width, n_heads, n_kv_heads, inv_freq)
    pos, stride_pb = position_args(positions, T, qkv.device)
    block_hq, block_hkv, block_half, single_pass = part_tiles(n_heads, n_kv_heads, D)
    q = torch.empty((B, T, n_heads, D), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((B, T, n_kv_heads, D), dtype=qkv.dtype, device=qkv.device)
    v = torch.empty_like(k)
    rstd = torch.empty((B * T, 2), dtype=torch.float32, device=qkv.device)
    if qkv.numel():
        _qk_norm_rope_fwd_kernel[(B * T,)](
            qkv, q_weight, k_weight, q, k, v, rstd, qkv if pos is None else pos, inv_freq, T, n_heads, n_kv_heads,
            D // 2, offset, qkv.stride(0), qkv.stride(1), stride_pb, eps, attention_factor, HAS_POS=pos is not None,
            BLOCK_HQ=block_hq, BLOCK_HKV=block_hkv, BLOCK_HALF=block_half, SINGLE_PASS=single_pass,
            num_warps=num_warps(2 * max(block_hq, block_hkv) * block_half))
    return q, k, v, rstd


def qk_norm_rope_bwd(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, qkv: torch.Tensor,
                     q_weight: torch.Tensor, k_weight: torch.Tensor, rstd: torch.Tensor,
                     positions: torch.Tensor | None, offset: int, inv_freq: torch.Tensor, attention_factor: float):
    """(dq `[B, T, Hq, D]`, dk, dv `[B, T, Hkv, D]`, any strides; the forward's qkv (unit last stride), weights,
    rstd) -> (dqkv `[B, T, (Hq + 2 Hkv) D]` contiguous in dq's dtype, dq_weight `[Hq D]`, dk_weight `[Hkv D]`
    fp32)."""
    B, T, n_heads, D = dq.shape
    n_kv_heads = dk.shape[2]
    _checked_geometry(qkv.shape[-1], n_heads, n_kv_heads, inv_freq)
    pos, stride_pb = position_args(positions, T, dq.device)
    block_hq, block_hkv, block_half, single_pass = part_tiles(n_heads, n_kv_heads, D)
    rows = B * T
    dqkv = torch.empty((B, T, (n_heads + 2 * n_kv_heads) * D), dtype=dq.dtype, device=dq.device)
    programs = persistent_programs(rows, dq.device)
    partial = torch.empty if single_pass and rows else torch.zeros  # no row: no program writes its partial sums
    dw = partial((programs, (n_heads + n_kv_heads) * D), dtype=torch.float32, device=dq.device)
    if rows:
        _qk_norm_rope_bwd_kernel[(programs,)](
            dq, dk, dv, qkv, q_weight, k_weight, rstd, dqkv, dw, dq if pos is None else pos, inv_freq, rows, T,
            n_heads, n_kv_heads, D // 2, offset, *dq.stride(), *dk.stride(), *dv.stride(), qkv.stride(0),
            qkv.stride(1), stride_pb, attention_factor, HAS_POS=pos is not None, BLOCK_HQ=block_hq,
            BLOCK_HKV=block_hkv, BLOCK_HALF=block_half, SINGLE_PASS=single_pass,
            num_warps=num_warps(2 * max(block_hq, block_hkv) * block_half))
    return dqkv, dw[:, :n_heads * D].sum(0), dw[:, n_heads * D:].sum(0)


KERNELS = {"qk_norm_rope_fwd": qk_norm_rope_fwd, "qk_norm_rope_bwd": qk_norm_rope_bwd}
