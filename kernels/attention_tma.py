"""Clipped-QKV flash attention forward for Hopper: Q/K/V/O through tensor descriptors (TMA), variant "tma".

Same contract and math as `attention._attn_fwd` (kernels/attention.py: O = softmax(scale * c(Q) c(K)^T + mask) c(V),
bottom-right causal alignment, sliding windows skipping the key blocks before the window's first one
(`attention.kv_range`), GQA by head index, rows with no key give 0 and LSE = +inf, LSE in base 2 of the scaled
scores), so `attention.attention_bwd` differentiates its output. What differs:
  - Loads and the output store go through `tl.make_tensor_descriptor` (one 2-D [T, HEAD_DIM] descriptor per
    (batch, head) slab, built on the device): on sm_90 the K/V stream becomes `cp.async.bulk.tensor` copies into
    shared memory completing on mbarriers, pipelined num_stages deep, and the tile edges (rows past T, columns
    past HEAD_DIM when HEAD_DIM < BLOCK_D) are zero-filled / clipped by the copy engine instead of masks.
    The interpreter runs the same descriptors (triton >= 3.6).
  - The softmax step is one FMA per score: p = exp2(s * qk_scale - m), with s the raw dot and m the running max
    already in scaled base-2 units (m = max(s) * qk_scale, valid as qk_scale > 0; the host sends other scales to
    the "fa2" kernel).
  - Lazy rescaling: the accumulator (acc, l) is rescaled to a new running max only when some row's max grows by
    more than RESCALE_LOG2 (8: p <= 2^8, far inside fp16/bf16 and fp32 range); otherwise p is taken against the
    stale max. Exact: l and acc always refer to the same m, and out = acc / l, LSE = m + log2(l) at the end.
  - Scheduling: axis 0 enumerates the query blocks longest first across every (batch, head), so the longest
    causal blocks start first on the whole GPU and the short ones fill the tail.
Not here: warp specialization. `tl.range(..., warp_specialize=True)` compiles to the same PTX on sm_90 with
triton 3.9 (no setmaxnreg, no producer partition: OSS Triton specializes warps on Blackwell only), so it is no knob.
Work: 4 P FLOPs as the "fa2" forward (P = B * H * Tq * Tk * D, halved when causal with Tq = Tk). Bytes: the same,
e*B*D*(2*H*Tq + 2*Hkv*Tk) + 4*B*H*Tq from HBM (K/V re-read per query block, mostly from L2).
Descriptors need 16-byte aligned slab bases and row strides (the host checks, else "fa2"), and, on a GPU, a
global-memory allocator for the device-side descriptors (`triton.set_allocator`, set before each launch).
TMA exists on sm_90+ only: on other targets (sm_80, AMD) the host runs the "fa2" kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _tuning
from ._clamp import clamp
from .attention import _KEY, _common, _fwd_footprint, attention_fwd, configs, key_first, key_limit, kv_range, visible

RESCALE_LOG2 = tl.constexpr(8.0)  # lazy rescaling threshold: log2(256)

# (BLOCK_M, BLOCK_N, warps, stages): sm_90 only (other targets never launch this kernel); pruned by `_tuning` as
# the other kernels (fp32 inputs keep the small ones).
_CONFIGS = configs([(128, 128, 8, 2), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3),
                    (64, 32, 4, 3)], hip=[], interpret=(32, 16))


@triton.jit
def _attend(acc, m_i, l_i, q, k_desc, v_desc, offs_n0, first, limit, lo, hi, clip, qk_scale,
            HAS_CLIP: tl.constexpr, MASK: tl.constexpr, WINDOWED: tl.constexpr, BLOCK_N: tl.constexpr,
            DOT_PRECISION: tl.constexpr):
    """Online softmax over key blocks [lo, hi) with one-FMA exponent and lazy rescaling (module docstring); with
    MASK, row r keeps keys < limit[r] (and, WINDOWED, >= first[r]). A row that has seen no key keeps m_i = -inf,
    l_i = 0."""
    for start_n in range(lo, hi, BLOCK_N):
        k = clamp(k_desc.load([start_n, 0]), clip, HAS_CLIP)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if MASK:
            s = tl.where(visible(start_n + offs_n0, first, limit, WINDOWED), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        grow = m_new - tl.maximum(m_i, -1e30)  # +huge from -inf to finite, -inf (not NaN) if both are -inf
        if tl.max(grow, 0) > RESCALE_LOG2:
            alpha = tl.exp2(m_i - tl.where(m_new == float("-inf"), 0.0, m_new))
            acc = acc * alpha[:, None]
            l_i = l_i * alpha
            m_i = m_new
        p = tl.exp2(s * qk_scale - tl.where(m_i == float("-inf"), 0.0, m_i)[:, None])
        l_i += tl.sum(p, 1)
        v = clamp(v_desc.load([start_n, 0]), clip, HAS_CLIP)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, m_i, l_i


@_tuning.autotune(_CONFIGS, _KEY, _fwd_footprint)
@triton.jit
def _attn_fwd_tma(Q, K, V, O, LSE,
                  sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh,
                  BH, H, GROUP, Tq, Tk, Q_BUCKET, K_BUCKET, qk_scale, clip, window,
                  HAS_CLIP: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    bh = (pid % BH).to(tl.int64)
    start_m = (tl.cdiv(Tq, BLOCK_M) - 1 - pid // BH) * BLOCK_M  # longest causal blocks first, over all heads
    b, h = bh // H, bh % H
    kh = h // GROUP
    q_desc = tl.make_tensor_descriptor(Q + b * sqb + h * sqh, shape=[Tq, HEAD_DIM], strides=[sqt, 1],
                                       block_shape=[BLOCK_M, BLOCK_D])
    k_desc = tl.make_tensor_descriptor(K + b * skb + kh * skh, shape=[Tk, HEAD_DIM], strides=[skt, 1],
                                       block_shape=[BLOCK_N, BLOCK_D])
    v_desc = tl.make_tensor_descriptor(V + b * svb + kh * svh, shape=[Tk, HEAD_DIM], strides=[svt, 1],
                                       block_shape=[BLOCK_N, BLOCK_D])
    q = clamp(q_desc.load([start_m, 0]), clip, HAS_CLIP)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    first = key_first(offs_m, Tq, Tk, window, WINDOWED)
    limit = key_limit(offs_m, Tq, Tk, CAUSAL)
    n_lo, w_full, n_full, n_end = kv_range(start_m, Tq, Tk, window, CAUSAL, WINDOWED, BLOCK_M, BLOCK_N)
    if WINDOWED:
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_desc, v_desc, offs_n0, first, limit, n_lo, w_full, clip,
                                qk_scale, HAS_CLIP, True, True, BLOCK_N, DOT_PRECISION)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_desc, v_desc, offs_n0, first, limit, w_full, n_full, clip,
                            qk_scale, HAS_CLIP, False, WINDOWED, BLOCK_N, DOT_PRECISION)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_desc, v_desc, offs_n0, first, limit, n_full, n_end, clip,
                            qk_scale, HAS_CLIP, True, WINDOWED, BLOCK_N, DOT_PRECISION)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + bh * Tq + offs_m, lse, mask=offs_m < Tq)
    o_desc = tl.make_tensor_descriptor(O + b * sob + h * soh, shape=[Tq, HEAD_DIM], strides=[sot, 1],
                                       block_shape=[BLOCK_M, BLOCK_D])
    o_desc.store([start_m, 0], out.to(O.dtype.element_ty))


# ---------------------------------------------------------------------------------------------- host side
def _device_allocator(size: int, alignment: int, stream) -> torch.Tensor:
    """Global scratch for device-side tensor descriptors (128 bytes each per program), from torch's caching
    allocator."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator(device: torch.device) -> None:
    """Install `_device_allocator` before a GPU launch. Per launch, not once: Triton keeps the allocator in a
    ContextVar, so each thread (autograd's device threads run recomputed forwards) needs its own."""
    if device.type == "cuda":
        triton.set_allocator(_device_allocator)


def tma_usable(*tensors: torch.Tensor) -> bool:
    """Whether the target has TMA (sm_90+) and every [B, T, H, D] tensor's slab bases and row strides are
    16-byte aligned with a unit last stride (what a tensor descriptor requires)."""
    target = _tuning.current()
    if target.backend == "hip" or (target.backend == "cuda" and int(target.name.split("_")[-1]) < 90):
        return False
    for t in tensors:
        e = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s * e % 16 for s in t.stride()[:3]):
            return False
    return True


def attention_fwd_tma(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, clip: float | None,
                      scale: float, window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention.attention_fwd`'s contract, through descriptors where `tma_usable` and scale > 0 (the one-FMA
    exponent needs a positive scale), else the "fa2" kernel."""
    B, Tq, H, D = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if out.numel() == 0 or k.shape[1] == 0 or scale <= 0 or not tma_usable(q, k, v, out):
        return attention_fwd(q, k, v, causal, clip, scale, window)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    _ensure_allocator(q.device)
    args = _common(q, k, causal, clip, scale, window)
    grid = lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]) * B * H,)  # noqa: E731
    _attn_fwd_tma[grid](q, k, v, out, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
                        BH=B * H, **args)
    return out, lse
