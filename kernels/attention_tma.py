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
    causal blocks start first on the whole GPU and the short ones fill the tail. Variant "tma-persistent" runs
    a persistent grid instead (`_attn_fwd_tma_persistent`: PROGRAMS_PER_SM programs per SM, each walking the
    blocks pid, pid + grid, ... in that order, its descriptors made once over the whole [B, T, H, HEAD_DIM]
    tensors): no per-block launch and descriptor set-up, the same longest-first balance.
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
from .attention import (
    _KEY,
    _common,
    _fwd_footprint,
    attention_fwd,
    configs,
    key_first,
    key_limit,
    kv_range,
    softmax_result,
    visible,
)

RESCALE_LOG2 = tl.constexpr(8.0)  # lazy rescaling threshold: log2(256)

# (BLOCK_M, BLOCK_N, warps, stages): sm_90 only (other targets never launch this kernel); pruned by `_tuning` as
# the other kernels (fp32 inputs keep the small ones). The persistent kernel holds its descriptors and the loop
# state on top: 128 x 128 tiles three stages deep spill there (8 B on sm_90), so it does without that one.
_SHAPES = [(128, 128, 8, 2), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 32, 4, 3)]
_CONFIGS = configs(_SHAPES, hip=[], interpret=(32, 16))
_PERSISTENT_CONFIGS = configs([s for s in _SHAPES if s != (128, 128, 8, 3)], hip=[], interpret=(32, 16))


@triton.jit
def _slab_load(desc, b, start, head, SLAB4D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows [start, start + BLOCK) of head `head` of batch `b`: from a [T, HEAD_DIM] descriptor of that slab, or
    (SLAB4D) from a [B, T, H, HEAD_DIM] descriptor of the whole tensor."""
    if SLAB4D:
        return desc.load([b, start, head, 0]).reshape(BLOCK, BLOCK_D)
    else:
        return desc.load([start, 0])


@triton.jit
def _attend(acc, m_i, l_i, q, k_desc, v_desc, b, kh, offs_n0, first, limit, lo, hi, clip, qk_scale,
            HAS_CLIP: tl.constexpr, MASK: tl.constexpr, WINDOWED: tl.constexpr, SLAB4D: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over key blocks [lo, hi) with one-FMA exponent and lazy rescaling (module docstring); with
    MASK, row r keeps keys < limit[r] (and, WINDOWED, >= first[r]). A row that has seen no key keeps m_i = -inf,
    l_i = 0."""
    for start_n in range(lo, hi, BLOCK_N):
        k = clamp(_slab_load(k_desc, b, start_n, kh, SLAB4D, BLOCK_N, BLOCK_D), clip, HAS_CLIP)
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
        v = clamp(_slab_load(v_desc, b, start_n, kh, SLAB4D, BLOCK_N, BLOCK_D), clip, HAS_CLIP)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def _tma_tile(tile, q_desc, k_desc, v_desc, o_desc, LSE, b, h, BH, GROUP, Tq, Tk, qk_scale, clip, window,
              HAS_CLIP: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, SLAB4D: tl.constexpr,
              BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query block `tile // BH` from the end (the longest causal ones first, over all heads) of (batch, head)
    (b, h) = divmod(tile % BH, H): its rows of O and LSE."""
    start_m = (tl.cdiv(Tq, BLOCK_M) - 1 - tile // BH) * BLOCK_M
    kh = h // GROUP
    q = clamp(_slab_load(q_desc, b, start_m, h, SLAB4D, BLOCK_M, BLOCK_D), clip, HAS_CLIP)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    first = key_first(offs_m, Tq, Tk, window, WINDOWED)
    limit = key_limit(offs_m, Tq, Tk, CAUSAL)
    n_lo, w_full, n_full, n_end = kv_range(start_m, Tq, Tk, window, CAUSAL, WINDOWED, BLOCK_M, BLOCK_N)
    if WINDOWED:
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_desc, v_desc, b, kh, offs_n0, first, limit, n_lo, w_full, clip,
                                qk_scale, HAS_CLIP, True, True, SLAB4D, BLOCK_N, BLOCK_D, DOT_PRECISION)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_desc, v_desc, b, kh, offs_n0, first, limit, w_full, n_full, clip,
                            qk_scale, HAS_CLIP, False, WINDOWED, SLAB4D, BLOCK_N, BLOCK_D, DOT_PRECISION)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_desc, v_desc, b, kh, offs_n0, first, limit, n_full, n_end, clip,
                            qk_scale, HAS_CLIP, True, WINDOWED, SLAB4D, BLOCK_N, BLOCK_D, DOT_PRECISION)

    out, lse = softmax_result(acc, m_i, l_i, float("inf"))
    tl.store(LSE + (tile % BH).to(tl.int64) * Tq + offs_m, lse, mask=offs_m < Tq)
    out = out.to(o_desc.dtype)
    if SLAB4D:
        o_desc.store([b, start_m, h, 0], out.reshape(1, BLOCK_M, 1, BLOCK_D))
    else:
        o_desc.store([start_m, 0], out)


@_tuning.autotune(_CONFIGS, _KEY, _fwd_footprint)
@triton.jit
def _attn_fwd_tma(Q, K, V, O, LSE,
                  sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh,
                  BH, H, GROUP, Tq, Tk, Q_BUCKET, K_BUCKET, qk_scale, clip, window,
                  HAS_CLIP: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per query block: descriptors of its (batch, head)'s [T, HEAD_DIM] slabs."""
    tile = tl.program_id(0)
    bh = (tile % BH).to(tl.int64)
    b, h = bh // H, bh % H
    kh = h // GROUP
    q_desc = tl.make_tensor_descriptor(Q + b * sqb + h * sqh, shape=[Tq, HEAD_DIM], strides=[sqt, 1],
                                       block_shape=[BLOCK_M, BLOCK_D])
    k_desc = tl.make_tensor_descriptor(K + b * skb + kh * skh, shape=[Tk, HEAD_DIM], strides=[skt, 1],
                                       block_shape=[BLOCK_N, BLOCK_D])
    v_desc = tl.make_tensor_descriptor(V + b * svb + kh * svh, shape=[Tk, HEAD_DIM], strides=[svt, 1],
                                       block_shape=[BLOCK_N, BLOCK_D])
    o_desc = tl.make_tensor_descriptor(O + b * sob + h * soh, shape=[Tq, HEAD_DIM], strides=[sot, 1],
                                       block_shape=[BLOCK_M, BLOCK_D])
    _tma_tile(tile, q_desc, k_desc, v_desc, o_desc, LSE, b, h, BH, GROUP, Tq, Tk, qk_scale, clip, window,
              HAS_CLIP, CAUSAL, WINDOWED, False, BLOCK_D, DOT_PRECISION, BLOCK_M, BLOCK_N)


@_tuning.autotune(_PERSISTENT_CONFIGS, _KEY, _fwd_footprint)
@triton.jit
def _attn_fwd_tma_persistent(Q, K, V, O, LSE,
                             sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh,
                             B, BH, H, Hkv, GROUP, Tq, Tk, Q_BUCKET, K_BUCKET, qk_scale, clip, window,
                             HAS_CLIP: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
                             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A persistent grid (a few programs per SM): each program walks the query blocks tile = pid, pid + grid, ...
    in the longest-first order, through [B, T, H, HEAD_DIM] descriptors made once per program."""
    q_desc = tl.make_tensor_descriptor(Q, shape=[B, Tq, H, HEAD_DIM], strides=[sqb, sqt, sqh, 1],
                                       block_shape=[1, BLOCK_M, 1, BLOCK_D])
    k_desc = tl.make_tensor_descriptor(K, shape=[B, Tk, Hkv, HEAD_DIM], strides=[skb, skt, skh, 1],
                                       block_shape=[1, BLOCK_N, 1, BLOCK_D])
    v_desc = tl.make_tensor_descriptor(V, shape=[B, Tk, Hkv, HEAD_DIM], strides=[svb, svt, svh, 1],
                                       block_shape=[1, BLOCK_N, 1, BLOCK_D])
    o_desc = tl.make_tensor_descriptor(O, shape=[B, Tq, H, HEAD_DIM], strides=[sob, sot, soh, 1],
                                       block_shape=[1, BLOCK_M, 1, BLOCK_D])
    for tile in range(tl.program_id(0), tl.cdiv(Tq, BLOCK_M) * BH, tl.num_programs(0)):
        bh = tile % BH
        _tma_tile(tile, q_desc, k_desc, v_desc, o_desc, LSE, bh // H, bh % H, BH, GROUP, Tq, Tk, qk_scale, clip,
                  window, HAS_CLIP, CAUSAL, WINDOWED, True, BLOCK_D, DOT_PRECISION, BLOCK_M, BLOCK_N)


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
                      scale: float, window: int | None = None, persistent: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention.attention_fwd`'s contract, through descriptors where `tma_usable` and scale > 0 (the one-FMA
    exponent needs a positive scale), else the "fa2" kernel. `persistent`: a grid of `persistent_grid` programs
    walking the query blocks instead of one program per block."""
    B, Tq, H, D = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if out.numel() == 0 or k.shape[1] == 0 or scale <= 0 or not tma_usable(q, k, v, out):
        return attention_fwd(q, k, v, causal, clip, scale, window)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    _ensure_allocator(q.device)
    args = _common(q, k, causal, clip, scale, window)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3])
    if persistent:
        grid = lambda meta: (persistent_grid(triton.cdiv(Tq, meta["BLOCK_M"]) * B * H, q.device),)  # noqa: E731
        _attn_fwd_tma_persistent[grid](q, k, v, out, lse, *strides, B=B, BH=B * H, Hkv=k.shape[2], **args)
    else:
        grid = lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]) * B * H,)  # noqa: E731
        _attn_fwd_tma[grid](q, k, v, out, lse, *strides, BH=B * H, **args)
    return out, lse


PROGRAMS_PER_SM = 1  # the persistent forward's grid: programs per SM (a 128 x 128 config's tiles take over half
                     # of an sm_90 SM's shared memory)


def persistent_grid(tiles: int, device: torch.device) -> int:
    """Programs of the persistent forward: PROGRAMS_PER_SM per SM, at most one per tile; on the CPU interpreter
    a third of the tiles (so that programs do walk several)."""
    if device.type != "cuda":
        return max(1, tiles // 3)
    return min(tiles, PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count)
