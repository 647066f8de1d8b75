"""Clipped-QKV flash attention for training: forward and FlashAttention-2-style backward, in Triton.

Computes, per batch b and query head h (q [B, Tq, H, D]; k, v [B, Tk, Hkv, D]; any strides with stride(-1) == 1):
    O = softmax(scale * c(Q) c(K)^T + mask) c(V),   c(x) = min(max(x, -clip), clip)  (OLMo 1.7's QKV clipping)
The clamp is applied to each tile as it is loaded: no clipped copy is made, and no mask is kept for the backward.
K/V may have fewer heads (GQA/MQA): query head h reads key/value head h // (H // Hkv); K/V are never repeated.
Causal masks align bottom-right: query t sits at position i = t + Tk - Tq and sees keys j <= i; with a sliding
`window` (causal only) also i - j < window. A row that sees no key gives 0.
Softmax statistics and accumulation are fp32 (online softmax in base 2); the forward saves the log-sum-exp
LSE (base 2, of the scaled scores; [B, H, Tq] fp32; +inf for rows that see no key).

Backward: `_attn_bwd_delta` (delta = rowsum(dO * O)), `_attn_bwd_dkdv` (one program per key block of a kv head,
looping over the query blocks of every query head of its group, so GQA needs no atomics), `_attn_bwd_dq`
(one program per query block). dQ, dK, dV are multiplied by the clamp's gradient, 1 where -clip <= x <= clip
(inclusive, as torch.clamp) and 0 elsewhere, recomputed from the raw inputs. With `atomic_dq` (FlashAttention-2's
scheme) the dK/dV pass also adds dS K into an fp32 dQ buffer with atomics and `_attn_bwd_dq_finish` scales,
clamp-grads and casts it: no dQ pass.

Sliding windows skip work, not only mask it: the loops over key blocks (forward, dQ) start at the block of the
window's first key (`kv_range`), and the dK/dV pass visits only the query blocks between the key block's diagonal
and the window's far end (`q_range`); only the blocks that straddle an edge of the band are masked. Without a
window (WINDOWED false) none of that code is compiled in.

Work, with P = B * H * Tq * Tk * D (halved under a causal mask when Tq = Tk; with a window W << Tk about
B * H * Tq * W * D instead):
  forward  4 P FLOPs (QK^T, PV).  Backward 14 P FLOPs executed (the nominal 10 P = 2.5x forward, plus QK^T and
  dO V^T recomputed by the separate dQ pass); with `atomic_dq` the nominal 10 P.
Bytes (e = element size): forward reads Q, K, V and writes O, LSE: e*B*D*(2*H*Tq + 2*Hkv*Tk) + 4*B*H*Tq from HBM
(K/V tiles are re-read once per query block, mostly from L2). Backward reads Q, K, V, O, dO, LSE and writes dQ,
dK, dV plus the fp32 delta: e*B*D*(5*H*Tq + 4*Hkv*Tk) + 12*B*H*Tq; `atomic_dq` adds the fp32 dQ buffer's zeroing,
atomic adds (Tk / BLOCK_N times per element, mostly in L2) and final read: 4*B*H*Tq*D*3 bytes more from HBM.
Kernel contract (registered by variant name through kernels/attention_variants.py, which adds the `variant`
argument; `olmo_fast/ops/softmax_attention.py` validates the shapes and wraps them in custom ops with autograd):
  "attention_fwd"(q, k, v, causal: bool, clip: float | None, scale: float, window: int | None)
      -> (out [B, Tq, H, D] q.dtype, lse)
  "attention_bwd"(dout, q, k, v, out, lse, causal, clip, scale, window) -> (dq, dk, dv) in the inputs' shapes and
      dtype (window: None = unlimited, else >= 1 with causal)
  lse [B, H, Tq] fp32 only travels from a backend's forward to its own backward (here: base 2, scaled scores).
Offsets are int64 (a fused-qkv view's t * stride_t passes 2^31 at T ~ 175K); (block, batch x head) pairs are
folded into grid axis 0 (axis 1 would cap B * H at 65535).
Precision: tl.dot of fp32 inputs runs in tf32 on NVIDIA GPUs (tensor cores: 10-bit mantissa products, fp32 sums,
as torch's allow_tf32; an ieee fp32 dot takes minutes to compile and runs on CUDA cores), ieee elsewhere (AMD's
backend rejects tf32; the interpreter); bf16/fp16 dots are exact products with fp32 sums on every target.
Autotune configs are pruned per target (shared memory, registers; `_tuning.py`).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import _tuning
from ._clamp import clamp, clamp_grad, clip_bound

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def configs(cuda: list[tuple[int, ...]], hip: list[tuple[int, ...]], interpret: tuple[int, ...],
            names: tuple[str, ...] = ("BLOCK_M", "BLOCK_N")) -> dict[str, list[triton.Config]]:
    """Autotune configs per backend from (*block sizes named `names`, num_warps, num_stages), for
    `_tuning.autotune`; under the interpreter only the small `interpret` block sizes, so that CPU tests stay fast."""
    def make(shapes):
        return [triton.Config(dict(zip(names, s[:-2])), num_warps=s[-2], num_stages=s[-1]) for s in shapes]

    if INTERPRET:
        return {"cpu": make([(*interpret, 1, 1)])}
    return {"cuda": make(cuda), "hip": make(hip)}


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for inputs of `dtype` on the current target (module docstring: tf32 for fp32 on
    NVIDIA, ieee elsewhere; for bf16/fp16 both give the same code, and AMD rejects "tf32")."""
    return "tf32" if dtype == torch.float32 and _tuning.current().backend == "cuda" else "ieee"


def _fwd_footprint(config: triton.Config, args: dict, target: _tuning.Target) -> tuple[int, float]:
    """Forward tiles: acc [M, D] and scores [M, N] fp32; q [M, D] resident; k, v [N, D] streamed."""
    m, n, d = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], args["BLOCK_D"]
    return _tuning.tile_footprint(config, target, args["Q"].element_size(), m * d + m * n, m * d, 2 * n * d)


def _dkdv_footprint(config: triton.Config, args: dict, target: _tuning.Target) -> tuple[int, float]:
    """dK/dV tiles: dk, dv [N, D] and P^T, dP^T [N, M] fp32 (and dQ's [M, D] with ATOMIC_DQ); k, v [N, D]
    resident; q, dO [M, D] streamed."""
    m, n, d = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], args["BLOCK_D"]
    fp32 = 2 * n * d + 2 * n * m + (m * d if args.get("ATOMIC_DQ") else 0)
    return _tuning.tile_footprint(config, target, args["Q"].element_size(), fp32, 2 * n * d, 2 * m * d)


def _dq_footprint(config: triton.Config, args: dict, target: _tuning.Target) -> tuple[int, float]:
    """dQ tiles: dq [M, D] and P, dP [M, N] fp32; q, dO [M, D] resident; k, v [N, D] streamed."""
    m, n, d = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], args["BLOCK_D"]
    return _tuning.tile_footprint(config, target, args["Q"].element_size(), m * d + 2 * m * n, 2 * m * d,
                                  2 * n * d)


@triton.jit
def row_offsets(offs_t, stride_t):
    """int64 element offsets [len(offs_t), 1] of rows `offs_t` with row stride `stride_t` (both int32: their
    product passes 2^31 in long sequences of wide rows)."""
    return offs_t[:, None].to(tl.int64) * stride_t


# ---------------------------------------------------------------------------------------------- shared helpers
@triton.jit
def load_tile(ptr, offs_t, offs_d, stride_t, T, HEAD_DIM: tl.constexpr):
    """Rows `offs_t` (< T) of a [T, HEAD_DIM] slab with row stride `stride_t`; zeros outside."""
    mask = (offs_t[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
    return tl.load(ptr + row_offsets(offs_t, stride_t) + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _query_block(Tq, BLOCK_M: tl.constexpr):
    """(batch x head index (int64), first query row) of this program: axis 0 enumerates the query blocks of each
    (batch, head) in turn, the longest (causal) ones first."""
    blocks = tl.cdiv(Tq, BLOCK_M)
    pid = tl.program_id(0)
    return (pid // blocks).to(tl.int64), (blocks - 1 - pid % blocks) * BLOCK_M


@triton.jit
def key_limit(offs_m, Tq, Tk, CAUSAL: tl.constexpr):
    """How many keys each query row sees (bottom-right causal alignment), as a [BLOCK_M] vector."""
    if CAUSAL:
        return tl.minimum(offs_m + 1 + Tk - Tq, Tk)
    return tl.zeros_like(offs_m) + Tk


@triton.jit
def key_first(offs_m, Tq, Tk, window, WINDOWED: tl.constexpr):
    """The first key each query row sees under a sliding window (its position - window + 1; may be negative), as a
    [BLOCK_M] vector; 0 without a window."""
    if WINDOWED:
        return offs_m + Tk - Tq - window + 1
    return tl.zeros_like(offs_m)


@triton.jit
def visible(offs_n, first, limit, WINDOWED: tl.constexpr):
    """[len(first), len(offs_n)] mask: keys offs_n that each row sees (first <= key < limit)."""
    keep = offs_n[None, :] < limit[:, None]
    if WINDOWED:
        keep = keep & (offs_n[None, :] >= first[:, None])
    return keep


@triton.jit
def kv_range(start_m, Tq, Tk, window, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr):
    """(n_lo, w_full, n_full, n_end): the key blocks of the query block at start_m. [w_full, n_full) is visible to
    every row; [n_lo, w_full) (the window's far edge) and [n_full, n_end) (the diagonal) need the mask; keys
    before n_lo (the block of the window's first key) and from n_end on are never visited.
    n_lo <= w_full <= n_full <= n_end; n_lo = w_full = 0 without a window."""
    if CAUSAL:
        n_end = tl.maximum(tl.minimum(start_m + BLOCK_M + Tk - Tq, Tk), 0)
        n_full = tl.maximum(tl.minimum(start_m + 1 + Tk - Tq, Tk), 0) // BLOCK_N * BLOCK_N
    else:
        n_end = Tk
        n_full = Tk // BLOCK_N * BLOCK_N
    if WINDOWED:  # (clamped at 0 before dividing: integer division rounds toward zero on GPUs)
        n_lo = tl.minimum(tl.maximum(start_m + Tk - Tq - window + 1, 0) // BLOCK_N * BLOCK_N, n_full)
        w_full = tl.cdiv(tl.maximum(start_m + BLOCK_M + Tk - Tq - window, 0), BLOCK_N) * BLOCK_N
        w_full = tl.minimum(tl.maximum(w_full, n_lo), n_full)
    else:
        n_lo = 0
        w_full = 0
    return n_lo, w_full, n_full, n_end


@triton.jit
def q_range(start_n, Tq, Tk, window, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr):
    """(m_lo, m_full, m_wfull, m_hi): the query blocks that see the key block at start_n. Rows [m_full, m_wfull)
    see all of it; [m_lo, m_full) (the diagonal) and [m_wfull, m_hi) (the window's far edge) part of it (masked);
    rows before m_lo or from m_hi on see none of it and are never visited. m_lo <= m_full <= m_wfull <= m_hi <= Tq
    (m_hi: the end of the last block that holds a row that sees the key block)."""
    if CAUSAL:
        m_lo = tl.minimum(tl.maximum(start_n - (Tk - Tq), 0) // BLOCK_M * BLOCK_M, Tq)
        m_full = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - (Tk - Tq), 0), BLOCK_M) * BLOCK_M
        m_full = tl.minimum(tl.maximum(m_full, m_lo), Tq)
    else:
        m_lo = 0
        m_full = 0
    if WINDOWED:
        m_hi = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 + window - (Tk - Tq), 0), BLOCK_M) * BLOCK_M
        m_hi = tl.minimum(tl.maximum(m_hi, m_full), Tq)
        m_wfull = tl.maximum(start_n + window - (Tk - Tq), 0) // BLOCK_M * BLOCK_M
        m_wfull = tl.minimum(tl.maximum(m_wfull, m_full), m_hi)
    else:
        m_hi = Tq
        m_wfull = Tq
    return m_lo, m_full, m_wfull, m_hi


@triton.jit
def attend_blocks(acc, m_i, l_i, q, K, V, stride_kt, stride_vt, offs_d, first, limit, lo, hi, clip, qk_scale,
                  HAS_CLIP: tl.constexpr, MASK: tl.constexpr, WINDOWED: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online-softmax update of (acc, m_i, l_i) with keys [lo, hi); with MASK, row r keeps keys < limit[r] (and,
    WINDOWED, >= first[r]).

    Shared by the training forward and the decoding kernel. Scores are in base 2 (qk_scale = scale * log2 e);
    a row with no key so far keeps m_i = -inf, l_i = 0 (never NaN)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = clamp(load_tile(K, offs_n, offs_d, stride_kt, hi, HEAD_DIM), clip, HAS_CLIP)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASK:
            s = tl.where(visible(offs_n, first, limit, WINDOWED), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = clamp(load_tile(V, offs_n, offs_d, stride_vt, hi, HEAD_DIM), clip, HAS_CLIP)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def softmax_result(acc, m_i, l_i, EMPTY_LSE: tl.constexpr):
    """The end of an online softmax: out = acc / l and its base-2 log-sum-exp m + log2(l); a row that saw no key
    (l = 0) gives out 0 and lse EMPTY_LSE (+inf for the backward of the training forwards, -inf for decode's split
    merge)."""
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, EMPTY_LSE, m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    return out, lse


# ---------------------------------------------------------------------------------------------- forward
# Configs (BLOCK_M, BLOCK_N, warps, stages). NVIDIA's are pruned per target by `_tuning` (sm_80: 128x128 needs
# more shared memory than its 163 KB, and the tiles that spill there go); the last, small one is for fp32 inputs,
# whose tiles take twice the bytes (the others spill 1-2 KB or exceed shared memory there). AMD's are those that
# compile with at most ~60 B spilled on gfx90a (triton 3.6, bf16, head dim 128; its 4-stage pipelines fail and
# 128x128 spills 2 KB).
_FWD_CONFIGS = configs([(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3), (64, 32, 4, 4),
                        (128, 32, 4, 3), (32, 32, 4, 2)], hip=[(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3)],
                       interpret=(32, 16))
_KEY = ["Q_BUCKET", "K_BUCKET", "HEAD_DIM", "CAUSAL", "WINDOWED", "HAS_CLIP", "DOT_PRECISION"]


@_tuning.autotune(_FWD_CONFIGS, _KEY, _fwd_footprint)
@triton.jit
def _attn_fwd(Q, K, V, O, LSE,
              sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh,
              H, GROUP, Tq, Tk, Q_BUCKET, K_BUCKET, qk_scale, clip, window,
              HAS_CLIP: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh, start_m = _query_block(Tq, BLOCK_M)
    b, h = bh // H, bh % H
    kh = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = clamp(load_tile(Q + b * sqb + h * sqh, offs_m, offs_d, sqt, Tq, HEAD_DIM), clip, HAS_CLIP)
    K += b * skb + kh * skh
    V += b * svb + kh * svh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    first = key_first(offs_m, Tq, Tk, window, WINDOWED)
    limit = key_limit(offs_m, Tq, Tk, CAUSAL)
    n_lo, w_full, n_full, n_end = kv_range(start_m, Tq, Tk, window, CAUSAL, WINDOWED, BLOCK_M, BLOCK_N)
    if WINDOWED:
        acc, m_i, l_i = attend_blocks(acc, m_i, l_i, q, K, V, skt, svt, offs_d, first, limit, n_lo, w_full, clip,
                                      qk_scale, HAS_CLIP, True, True, HEAD_DIM, BLOCK_N, DOT_PRECISION)
    acc, m_i, l_i = attend_blocks(acc, m_i, l_i, q, K, V, skt, svt, offs_d, first, limit, w_full, n_full, clip,
                                  qk_scale, HAS_CLIP, False, WINDOWED, HEAD_DIM, BLOCK_N, DOT_PRECISION)
    acc, m_i, l_i = attend_blocks(acc, m_i, l_i, q, K, V, skt, svt, offs_d, first, limit, n_full, n_end, clip,
                                  qk_scale, HAS_CLIP, True, WINDOWED, HEAD_DIM, BLOCK_N, DOT_PRECISION)

    out, lse = softmax_result(acc, m_i, l_i, float("inf"))
    row_ok = offs_m < Tq
    tl.store(LSE + bh * Tq + offs_m, lse, mask=row_ok)
    o_ptrs = O + b * sob + h * soh + row_offsets(offs_m, sot) + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


# ---------------------------------------------------------------------------------------------- backward
@triton.jit
def _attn_bwd_delta(O, DO, DELTA, sob, sot, soh, sdb, sdt, sdh, H, Tq,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    bh, start_m = _query_block(Tq, BLOCK_M)
    b, h = bh // H, bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = load_tile(O + b * sob + h * soh, offs_m, offs_d, sot, Tq, HEAD_DIM).to(tl.float32)
    do = load_tile(DO + b * sdb + h * sdh, offs_m, offs_d, sdt, Tq, HEAD_DIM).to(tl.float32)
    tl.store(DELTA + bh * Tq + offs_m, tl.sum(o * do, 1), mask=offs_m < Tq)


@triton.jit
def _attn_bwd_dq_finish(DQACC, Q, DQ, sab, sat, sah, sqb, sqt, sqh, sdqb, sdqt, sdqh, H, Tq, scale, clip,
                        HAS_CLIP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """dQ = c'(Q) * scale * (the fp32 dS K that the atomic dK/dV pass summed), in dQ's dtype."""
    bh, start_m = _query_block(Tq, BLOCK_M)
    b, h = bh // H, bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dq = load_tile(DQACC + b * sab + h * sah, offs_m, offs_d, sat, Tq, HEAD_DIM) * scale
    if HAS_CLIP:
        dq = clamp_grad(dq, load_tile(Q + b * sqb + h * sqh, offs_m, offs_d, sqt, Tq, HEAD_DIM), clip, HAS_CLIP)
    mask = (offs_m[:, None] < Tq) & (offs_d[None, :] < HEAD_DIM)
    tl.store(DQ + b * sdqb + h * sdqh + row_offsets(offs_m, sdqt) + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=mask)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, Q, DO, LSE, DELTA, DQ, sqt, sdt, sdqt, offs_n, offs_d, lo, hi, Tq, Tk, window, clip,
                 qk_scale, HAS_CLIP: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, MASK: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 ATOMIC_DQ: tl.constexpr):
    """Accumulate one query head's query blocks [lo, hi) into dk (unscaled) and dv of one key block; with
    ATOMIC_DQ also add dS K (unscaled) of each query block into the fp32 rows of DQ (atomics: every key block of
    the head adds into them).

    Computed transposed (P^T = exp2(K Q^T - lse), [BLOCK_N, BLOCK_M]) so that every product has the key block's
    BLOCK_N rows as M and takes P^T, dS^T straight from registers (as the A operand) on Hopper's wgmma.
    Rows past Tq load LSE = +inf and dO = 0, so they add nothing without a mask."""
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        q = clamp(load_tile(Q, offs_m, offs_d, sqt, Tq, HEAD_DIM), clip, HAS_CLIP)
        do = load_tile(DO, offs_m, offs_d, sdt, Tq, HEAD_DIM)
        lse = tl.load(LSE + offs_m, mask=offs_m < Tq, other=float("inf"))
        delta = tl.load(DELTA + offs_m, mask=offs_m < Tq, other=0.0)
        pT = tl.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale - lse[None, :])
        if MASK:
            keep = offs_n[:, None] < key_limit(offs_m, Tq, Tk, CAUSAL)[None, :]
            if WINDOWED:
                keep = keep & (offs_n[:, None] >= key_first(offs_m, Tq, Tk, window, WINDOWED)[None, :])
            pT = tl.where(keep, pT, 0.0)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PRECISION)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(dsT.to(k.dtype)), k, input_precision=DOT_PRECISION)
            mask = (offs_m[:, None] < Tq) & (offs_d[None, :] < HEAD_DIM)
            tl.atomic_add(DQ + row_offsets(offs_m, sdqt) + offs_d[None, :], dq, mask=mask, sem="relaxed")
    return dk, dv


# NVIDIA: none spills on sm_90 (64x64 on 8 warps spilled 120 B there, 176 B with the atomic dQ: dropped; 16x128
# is pruned there). AMD: the two that stay under ~100 B spilled on gfx90a (the others spill 0.4-3.5 KB there).
_DKDV_CONFIGS = configs([(16, 64, 8, 3), (32, 64, 8, 2), (32, 64, 8, 3), (16, 128, 8, 2), (16, 32, 4, 2)],
                        hip=[(16, 64, 8, 3), (16, 128, 8, 2)], interpret=(16, 32))


@_tuning.autotune(_DKDV_CONFIGS, _KEY + ["ATOMIC_DQ"], _dkdv_footprint)
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, DQ,
                   sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh, sdkb, sdkt, sdkh, sdvb, sdvt, sdvh,
                   sdqb, sdqt, sdqh, H, GROUP, Tq, Tk, Q_BUCKET, K_BUCKET, scale, qk_scale, clip, window,
                   HAS_CLIP: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    blocks = tl.cdiv(Tk, BLOCK_N)
    pid = tl.program_id(0)
    bkh, start_n = (pid // blocks).to(tl.int64), pid % blocks * BLOCK_N
    Hkv = H // GROUP
    b, kh = bkh // Hkv, bkh % Hkv
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    K += b * skb + kh * skh
    V += b * svb + kh * svh
    k = clamp(load_tile(K, offs_n, offs_d, skt, Tk, HEAD_DIM), clip, HAS_CLIP)
    v = clamp(load_tile(V, offs_n, offs_d, svt, Tk, HEAD_DIM), clip, HAS_CLIP)

    m_lo, m_full, m_wfull, m_hi = q_range(start_n, Tq, Tk, window, CAUSAL, WINDOWED, BLOCK_M, BLOCK_N)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(GROUP):
        h = kh * GROUP + g
        Qh = Q + b * sqb + h * sqh
        DOh = DO + b * sdb + h * sdh
        DQh = DQ + b * sdqb + h * sdqh
        row = (b * H + h) * Tq
        dk, dv = _dkdv_blocks(dk, dv, k, v, Qh, DOh, LSE + row, DELTA + row, DQh, sqt, sdt, sdqt, offs_n, offs_d,
                              m_lo, m_full, Tq, Tk, window, clip, qk_scale, HAS_CLIP, CAUSAL, WINDOWED, True,
                              HEAD_DIM, BLOCK_M, DOT_PRECISION, ATOMIC_DQ)
        dk, dv = _dkdv_blocks(dk, dv, k, v, Qh, DOh, LSE + row, DELTA + row, DQh, sqt, sdt, sdqt, offs_n, offs_d,
                              m_full, m_wfull, Tq, Tk, window, clip, qk_scale, HAS_CLIP, CAUSAL, WINDOWED, False,
                              HEAD_DIM, BLOCK_M, DOT_PRECISION, ATOMIC_DQ)
        if WINDOWED:
            dk, dv = _dkdv_blocks(dk, dv, k, v, Qh, DOh, LSE + row, DELTA + row, DQh, sqt, sdt, sdqt, offs_n,
                                  offs_d, m_wfull, m_hi, Tq, Tk, window, clip, qk_scale, HAS_CLIP, CAUSAL, True, True,
                                  HEAD_DIM, BLOCK_M, DOT_PRECISION, ATOMIC_DQ)

    # The raw k, v are loaded again for the clamp's gradient rather than kept in registers across the loop.
    if HAS_CLIP:
        dk = clamp_grad(dk, load_tile(K, offs_n, offs_d, skt, Tk, HEAD_DIM), clip, HAS_CLIP)
        dv = clamp_grad(dv, load_tile(V, offs_n, offs_d, svt, Tk, HEAD_DIM), clip, HAS_CLIP)
    dk *= scale
    mask = (offs_n[:, None] < Tk) & (offs_d[None, :] < HEAD_DIM)
    dk_ptrs = DK + b * sdkb + kh * sdkh + row_offsets(offs_n, sdkt) + offs_d[None, :]
    dv_ptrs = DV + b * sdvb + kh * sdvh + row_offsets(offs_n, sdvt) + offs_d[None, :]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _dq_blocks(dq, q, do, lse, delta, K, V, skt, svt, offs_m, offs_d, first, limit, lo, hi, clip, qk_scale,
               HAS_CLIP: tl.constexpr, MASK: tl.constexpr, WINDOWED: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate key blocks [lo, hi) into dq (unscaled) of one query block."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = clamp(load_tile(K, offs_n, offs_d, skt, hi, HEAD_DIM), clip, HAS_CLIP)
        v = clamp(load_tile(V, offs_n, offs_d, svt, hi, HEAD_DIM), clip, HAS_CLIP)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale - lse[:, None])
        if MASK:
            p = tl.where(visible(offs_n, first, limit, WINDOWED), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


# AMD: those under ~100 B spilled on gfx90a (64x64 and 128x64 on 8 warps spill 0.5-0.7 KB there).
_DQ_CONFIGS = configs([(64, 64, 8, 3), (64, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3),
                       (32, 32, 4, 2)],
                      hip=[(64, 32, 4, 3), (128, 32, 8, 3), (64, 64, 4, 3)], interpret=(32, 16))


@_tuning.autotune(_DQ_CONFIGS, _KEY, _dq_footprint)
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ,
                 sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh, sdqb, sdqt, sdqh,
                 H, GROUP, Tq, Tk, Q_BUCKET, K_BUCKET, scale, qk_scale, clip, window,
                 HAS_CLIP: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh, start_m = _query_block(Tq, BLOCK_M)
    b, h = bh // H, bh % H
    kh = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    Q += b * sqb + h * sqh
    q = clamp(load_tile(Q, offs_m, offs_d, sqt, Tq, HEAD_DIM), clip, HAS_CLIP)
    do = load_tile(DO + b * sdb + h * sdh, offs_m, offs_d, sdt, Tq, HEAD_DIM)
    row_ok = offs_m < Tq
    lse = tl.load(LSE + bh * Tq + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh * Tq + offs_m, mask=row_ok, other=0.0)
    K += b * skb + kh * skh
    V += b * svb + kh * svh

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    first = key_first(offs_m, Tq, Tk, window, WINDOWED)
    limit = key_limit(offs_m, Tq, Tk, CAUSAL)
    n_lo, w_full, n_full, n_end = kv_range(start_m, Tq, Tk, window, CAUSAL, WINDOWED, BLOCK_M, BLOCK_N)
    if WINDOWED:
        dq = _dq_blocks(dq, q, do, lse, delta, K, V, skt, svt, offs_m, offs_d, first, limit, n_lo, w_full, clip,
                        qk_scale, HAS_CLIP, True, True, HEAD_DIM, BLOCK_N, DOT_PRECISION)
    dq = _dq_blocks(dq, q, do, lse, delta, K, V, skt, svt, offs_m, offs_d, first, limit, w_full, n_full, clip,
                    qk_scale, HAS_CLIP, False, WINDOWED, HEAD_DIM, BLOCK_N, DOT_PRECISION)
    dq = _dq_blocks(dq, q, do, lse, delta, K, V, skt, svt, offs_m, offs_d, first, limit, n_full, n_end, clip,
                    qk_scale, HAS_CLIP, True, WINDOWED, HEAD_DIM, BLOCK_N, DOT_PRECISION)
    if HAS_CLIP:  # raw q loaded again rather than kept in registers across the loop
        dq = clamp_grad(dq, load_tile(Q, offs_m, offs_d, sqt, Tq, HEAD_DIM), clip, HAS_CLIP)
    dq *= scale
    dq_ptrs = DQ + b * sdqb + h * sdqh + row_offsets(offs_m, sdqt) + offs_d[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


# ---------------------------------------------------------------------------------------------- host side
LOG2E = 1.4426950408889634


def _check_dtype(q: torch.Tensor) -> None:
    """What only this kernel needs (shapes and one shared dtype are checked by `ops.attention`)."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the Triton attention kernel takes fp16/bf16/fp32, got {q.dtype}")


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def effective_window(window: int | None, causal: bool, n_keys: int) -> int | None:
    """The window the kernels need: None where it hides nothing (window >= n_keys: a query sees at most its
    n_keys - 1 predecessors), so that the unwindowed kernels run; ValueError for a window < 1 or without causal."""
    if window is None:
        return None
    if window < 1 or not causal:
        raise ValueError(f"a sliding window needs causal=True and window >= 1, got window={window}, causal={causal}")
    return None if window >= n_keys else int(window)


def _common(q: torch.Tensor, k: torch.Tensor, causal: bool, clip: float | None, scale: float,
            window: int | None) -> dict:
    """Scalar and constexpr arguments shared by the forward and backward kernels."""
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    window = effective_window(window, causal, Tk)
    return dict(H=H, GROUP=H // k.shape[2], Tq=Tq, Tk=Tk, Q_BUCKET=triton.next_power_of_2(Tq),
                K_BUCKET=triton.next_power_of_2(Tk), qk_scale=scale * LOG2E, clip=clip_bound(clip, q.dtype),
                window=window or 0, HAS_CLIP=clip is not None, CAUSAL=bool(causal), WINDOWED=window is not None,
                HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), DOT_PRECISION=dot_precision(q.dtype))


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, clip: float | None,
                  scale: float, window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out [B, Tq, H, D] contiguous in q's dtype, lse [B, H, Tq] fp32 base 2, +inf for rows with no key)."""
    _check_dtype(q)
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    B, Tq, H, D = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    args = _common(q, k, causal, clip, scale, window)
    grid = lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]) * B * H,)  # noqa: E731
    _attn_fwd[grid](q, k, v, out, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], **args)
    return out, lse


def attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, causal: bool, clip: float | None, scale: float, window: int | None = None,
                  atomic_dq: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv), contiguous, in the inputs' dtype; the clamp's gradient included. dQ from its own pass
    (deterministic), or with `atomic_dq` summed in fp32 by the dK/dV pass (FlashAttention-2's 5 products per
    tile pair instead of 7; fp32 atomics: the summation order, so dQ's last bits, vary from run to run)."""
    _check_dtype(q)
    q, k, v, out, dout = (last_dim_contiguous(t) for t in (q, k, v, out, dout))
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if dq.numel() == 0 or dk.numel() == 0:  # no query or no key: nothing flows back
        return dq.zero_(), dk.zero_(), dv.zero_()
    args = _common(q, k, causal, clip, scale, window)
    delta = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    block_m = 16 if INTERPRET else 64
    _attn_bwd_delta[(triton.cdiv(Tq, block_m) * B * H,)](
        out, dout, delta, *out.stride()[:3], *dout.stride()[:3], H, Tq,
        HEAD_DIM=D, BLOCK_D=args["BLOCK_D"], BLOCK_M=block_m)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3])
    dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if atomic_dq else dq
    _attn_bwd_dkdv[lambda meta: (triton.cdiv(Tk, meta["BLOCK_N"]) * B * Hkv,)](
        q, k, v, dout, lse, delta, dk, dv, dq_acc, *strides, *dk.stride()[:3], *dv.stride()[:3],
        *dq_acc.stride()[:3], scale=scale, ATOMIC_DQ=atomic_dq, **args)
    if atomic_dq:
        _attn_bwd_dq_finish[(triton.cdiv(Tq, block_m) * B * H,)](
            dq_acc, q, dq, *dq_acc.stride()[:3], *q.stride()[:3], *dq.stride()[:3], H, Tq, scale, args["clip"],
            HAS_CLIP=args["HAS_CLIP"], HEAD_DIM=D, BLOCK_D=args["BLOCK_D"], BLOCK_M=block_m)
    else:
        _attn_bwd_dq[lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]) * B * H,)](
            q, k, v, dout, lse, delta, dq, *strides, *dq.stride()[:3], scale=scale, **args)
    return dq, dk, dv
