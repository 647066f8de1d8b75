"""Decoding attention (flash-decoding) in Triton: a few new queries against a KV cache, split across programs.

Computes, for q [B, Tq, H, D] and caches k, v [B, S, Hkv, D] (any strides, stride(-1) == 1) where sequence b holds
seqlens[b] valid keys (the Tq new ones last): query i of sequence b, at position p = seqlens[b] - Tq + i, attends
to keys 0 .. p (causal among the new tokens; slots past seqlens[b] are never read), with a sliding `window` only
to keys p - window + 1 .. p. Out [B, Tq, H, D] in q's dtype.

Split-K: the cache is cut into `num_splits` chunks; program (split, b * Hkv + kv head, row block) runs the online
softmax of the training forward (`attention.attend_blocks`, fp32, base 2) over one chunk for a block of rows
(q head of the kv head's group, query) - so K/V are read once per group, never repeated for GQA - and writes a
partial output and log-sum-exp (fp32). `_decode_combine` merges the splits (skipped when there is one split: the
split kernel then writes the output itself). Small batches get many splits so that every SM has work.
With a window, the splits cut the window's span (window + Tq - 1 keys at most) instead of the cache: they start
at the first key any query of the sequence sees (max(seqlens[b] - Tq - window + 1, 0), computed per sequence on
the device), so no key before the window is ever loaded, no split lies outside the window, and the split count
fits the work (a cache far longer than the window does not leave most programs idle).

Work: 4 * B * H * Tq * L * D FLOPs (L = mean seqlen, or min(seqlen, window + Tq - 1) with a window; the same L
in the K/V bytes). Bytes: e * B * Hkv * L * 2 * D of K/V read once (e =
element size; this dominates), plus q and out (e * 2 * B * Tq * H * D) and, with splits, the fp32 partials written
and read back: 2 * 4 * B * H * Tq * num_splits * (D + 1).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _tuning
from .attention import (
    LOG2E,
    attend_blocks,
    configs,
    dot_precision,
    effective_window,
    last_dim_contiguous,
    row_offsets,
    softmax_result,
)

CHUNK_ALIGN = 128  # split chunks are multiples of this (and of every BLOCK_N below)
MAX_SPLITS = 128
# Split programs per SM that the split count aims at; the A/B of `olmo-fast bench --ops decode_attention` times
# the others (benchmarks/providers.py: `ours-triton[splits=<k>/SM]`), the default to change only on its numbers.
PROGRAMS_PER_SM = 2
PROGRAMS_PER_SM_VARIANTS = (1, 4, 8)

_SHAPES = [(32, 2, 2), (64, 4, 2), (64, 4, 3), (32, 4, 3), (128, 4, 2)]  # (BLOCK_N, warps, stages)
_SPLIT_CONFIGS = configs(_SHAPES, hip=_SHAPES, interpret=(16,), names=("BLOCK_N",))


def _split_footprint(config: triton.Config, args: dict, target: _tuning.Target) -> tuple[int, float]:
    """Split tiles: acc [M, D] and scores [M, N] fp32; q [M, D] resident; k, v [N, D] streamed."""
    m, n, d = args["BLOCK_M"], config.kwargs["BLOCK_N"], args["BLOCK_D"]
    return _tuning.tile_footprint(config, target, args["Q"].element_size(), m * d + m * n, m * d, 2 * n * d)


@triton.jit
def split_range(split, CHUNK, seqlen, Tq, window, WINDOWED: tl.constexpr, BLOCK_N: tl.constexpr):
    """(lo, w_full, n_full, hi): the keys [lo, hi) of one split, visited as [lo, w_full) masked (the window's far
    edge), [w_full, n_full) seen by every query of the sequence, [n_full, hi) masked (the new tokens' diagonal);
    lo <= w_full <= n_full. Split s covers CHUNK keys from s * CHUNK, shifted with a window to the first key any
    query sees; hi = lo when the split starts past the sequence (nothing visited)."""
    lo = split * CHUNK
    if WINDOWED:
        lo += tl.maximum(seqlen - Tq - window + 1, 0)
    hi = tl.maximum(tl.minimum(lo + CHUNK, seqlen), lo)
    n_full = tl.maximum(tl.minimum(seqlen - Tq + 1, hi) - lo, 0) // BLOCK_N * BLOCK_N + lo
    if WINDOWED:  # (clamped at 0 before dividing: integer division rounds toward zero on GPUs)
        w_full = tl.cdiv(tl.maximum(seqlen - window - lo, 0), BLOCK_N) * BLOCK_N + lo
        w_full = tl.minimum(w_full, n_full)
    else:
        w_full = lo
    return lo, w_full, n_full, hi


@_tuning.autotune(_SPLIT_CONFIGS, ["CHUNK", "HEAD_DIM", "ROWS", "SINGLE", "WINDOWED"], _split_footprint)
@triton.jit
def _decode_split(Q, K, V, SEQLENS, O, OPART, LPART,
                  sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh,
                  H, Hkv, GROUP, Tq, CHUNK, n_splits, qk_scale, window,
                  ROWS: tl.constexpr, SINGLE: tl.constexpr, WINDOWED: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Axis 0 enumerates (split, row block, batch x kv head), splits fastest: no grid axis caps B * Hkv.
    pid = tl.program_id(0)
    row_blocks = tl.cdiv(GROUP * Tq, ROWS)
    split = pid % n_splits
    bkh = (pid // n_splits // row_blocks).to(tl.int64)
    b, kh = bkh // Hkv, bkh % Hkv
    # Row r of the block is query i of head kh * GROUP + g, with r = g * Tq + i.
    rows = pid // n_splits % row_blocks * ROWS + tl.arange(0, BLOCK_M)
    row_ok = (rows < GROUP * Tq) & (tl.arange(0, BLOCK_M) < ROWS)
    g, i = rows // Tq, rows % Tq
    h = kh * GROUP + g
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    q_ptrs = Q + b * sqb + row_offsets(i, sqt) + row_offsets(h, sqh) + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok, other=0.0)

    seqlen = tl.load(SEQLENS + b).to(tl.int32)
    lo, w_full, n_full, hi = split_range(split, CHUNK, seqlen, Tq, window, WINDOWED, BLOCK_N)
    limit = tl.minimum(seqlen - Tq + i + 1, hi)  # keys each row sees, within this chunk: [first, limit)
    first = seqlen - Tq + i - window + 1
    K += b * skb + kh * skh
    V += b * svb + kh * svh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if WINDOWED:
        acc, m_i, l_i = attend_blocks(acc, m_i, l_i, q, K, V, skt, svt, offs_d, first, limit, lo, w_full, 0.0,
                                      qk_scale, False, True, True, HEAD_DIM, BLOCK_N, DOT_PRECISION)
    acc, m_i, l_i = attend_blocks(acc, m_i, l_i, q, K, V, skt, svt, offs_d, first, limit, w_full, n_full, 0.0,
                                  qk_scale, False, False, WINDOWED, HEAD_DIM, BLOCK_N, DOT_PRECISION)
    acc, m_i, l_i = attend_blocks(acc, m_i, l_i, q, K, V, skt, svt, offs_d, first, limit, n_full, hi, 0.0,
                                  qk_scale, False, True, WINDOWED, HEAD_DIM, BLOCK_N, DOT_PRECISION)

    out, lse = softmax_result(acc, m_i, l_i, float("-inf"))
    if SINGLE:
        o_ptrs = O + b * sob + row_offsets(i, sot) + row_offsets(h, soh) + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok)
    else:
        part = ((b * H + h) * Tq + i) * n_splits + split  # [B, H, Tq, n_splits]
        tl.store(LPART + part, lse, mask=row_ok)
        tl.store(OPART + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_ok[:, None] & d_ok)


@triton.jit
def _decode_combine(OPART, LPART, O, sob, sot, soh, H, Tq, n_splits,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # (b * H + h) * Tq + i
    b, h, i = row // (H * Tq), (row // Tq) % H, row % Tq
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    lse = tl.load(LPART + row * n_splits + offs_s, mask=offs_s < n_splits, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(lse == float("-inf"), 0.0, tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m)))
    parts = tl.load(OPART + (row * n_splits + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                    mask=(offs_s[:, None] < n_splits) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * parts, 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(O + b * sob + i * sot + h * soh + offs_d, out.to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)


def default_splits(programs: int, slots: int, sms: int, per_sm: int) -> int:
    """Splits for about `per_sm` programs per SM on `sms` SMs (0: the CPU, one program), each with at least
    CHUNK_ALIGN slots."""
    want = per_sm * sms if sms else 1
    return max(1, min(triton.cdiv(want, programs), triton.cdiv(slots, CHUNK_ALIGN), MAX_SPLITS))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens: torch.Tensor,
                     scale: float | None = None, window: int | None = None, num_splits: int | None = None,
                     programs_per_sm: int = PROGRAMS_PER_SM) -> torch.Tensor:
    """Out [B, Tq, H, D] (q's dtype) of q over the first seqlens[b] slots of each cache; see the module docstring.
    Splits: `num_splits`, else as many as give about `programs_per_sm` programs per SM.

    Inputs as `ops.decode_attention` validates them (shapes, one dtype, integer seqlens); seqlens[b] must lie in
    [Tq, S] (not checked on the device: that would synchronise)."""
    q, k_cache, v_cache = (last_dim_contiguous(t) for t in (q, k_cache, v_cache))
    B, Tq, H, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    group = H // Hkv
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    window = effective_window(window, True, S)
    rows = min(triton.next_power_of_2(group * Tq), 64)  # rows of one program: (head of the group, query) pairs
    row_blocks = triton.cdiv(group * Tq, rows)
    span = max(S if window is None else min(S, window + Tq - 1), 1)  # keys a sequence's queries may see
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.device.type == "cuda" else 0
    splits = num_splits or default_splits(B * Hkv * row_blocks, span, sms, programs_per_sm)
    chunk = triton.cdiv(triton.cdiv(span, splits), CHUNK_ALIGN) * CHUNK_ALIGN
    splits = triton.cdiv(span, chunk)
    single = splits == 1
    opart = out if single else torch.empty((B, H, Tq, splits, D), dtype=torch.float32, device=q.device)
    lpart = out if single else torch.empty((B, H, Tq, splits), dtype=torch.float32, device=q.device)
    block_d = max(16, triton.next_power_of_2(D))
    _decode_split[(splits * row_blocks * B * Hkv,)](
        q, k_cache, v_cache, seqlens, out, opart, lpart, *q.stride()[:3], *k_cache.stride()[:3],
        *v_cache.stride()[:3], *out.stride()[:3], H, Hkv, group, Tq, chunk, splits, scale * LOG2E, window or 0,
        ROWS=rows, SINGLE=single, WINDOWED=window is not None, HEAD_DIM=D, BLOCK_D=block_d,
        DOT_PRECISION=dot_precision(q.dtype), BLOCK_M=max(16, rows))
    if not single:
        _decode_combine[(B * H * Tq,)](opart, lpart, out, *out.stride()[:3], H, Tq, splits,
                                       HEAD_DIM=D, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(splits))
    return out


KERNELS = {"decode_attention": decode_attention}
