"""Rotary position embedding of one `[B, T, H, D]` tensor (q or k), any strides, fp32 math; the inverse
rotation (by -angle) is its backward.

Pair i of a head (dims i and i + D/2 in NeoX's rotate-half layout, OLMo's; dims 2i and 2i + 1 with
INTERLEAVED, GPT-J's) turns by angle = position * inv_freq[i], inv_freq[i] = theta^(-2i/D):
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin).
One program per (b, t) computes the D/2 cos/sin once and applies them to every head (head chunks on grid
axis 1). The only table is inv_freq (D/2 floats, computed once per (D, theta, device) exactly as the fp32
reference computes it, so the angles match it); positions come from a `[T]`/`[B, T]` tensor or `offset + t`.
The rotation math (`rope_cos_sin`, `pair_offsets`, `rotate`) is shared with the fused qkv prologue.
Bytes per element (E = element size): reads E, writes E (plus 8 B of position per token).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._launch import next_pow2, num_warps, to_dtype

MAX_TILE = 4096  # head elements per program: heads beyond it go to more programs (grid axis 1)


@functools.lru_cache(maxsize=64)
def inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """theta^(-2i/D), i < D/2, in fp32, as `olmo_fast.ops.reference.rope_cos_sin` computes it."""
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    return 1.0 / (theta ** exponents)


@triton.jit
def rope_cos_sin(pos, INV_FREQ, pair, HALF):
    """fp32 cos and sin `[BLOCK_HALF]` of `pos * inv_freq[pair]` (pos a scalar position)."""
    angle = pos.to(tl.float32) * tl.load(INV_FREQ + pair, mask=pair < HALF, other=0.0)
    return tl.cos(angle), tl.sin(angle)


@triton.jit
def pair_offsets(pair, HALF, INTERLEAVED: tl.constexpr):
    """Offsets (in head dims) of the two members of each rotation pair."""
    if INTERLEAVED:
        return 2 * pair, 2 * pair + 1
    else:
        return pair, pair + HALF


@triton.jit
def rotate(x1, x2, cos, sin, INVERSE: tl.constexpr):
    """Rotate the fp32 pairs (x1, x2) by the angle (INVERSE: by minus the angle)."""
    if INVERSE:
        sin = -sin
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def token_position(POS, stride_pb, b, t, offset, HAS_POS: tl.constexpr):
    if HAS_POS:
        return tl.load(POS + b * stride_pb + t)
    else:
        return offset + t


@triton.jit
def _rope_kernel(X, OUT, POS, INV_FREQ, T, H, HALF, offset, stride_b, stride_t, stride_h, stride_d, stride_pb,
                 HAS_POS: tl.constexpr, INVERSE: tl.constexpr, INTERLEAVED: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    bt = tl.program_id(0).to(tl.int64)
    b, t = bt // T, bt % T
    pair = tl.arange(0, BLOCK_HALF)
    cos, sin = rope_cos_sin(token_position(POS, stride_pb, b, t, offset, HAS_POS), INV_FREQ, pair, HALF)
    heads = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)  # strides can be large
    mask = (heads < H)[:, None] & (pair < HALF)[None, :]
    i1, i2 = pair_offsets(pair.to(tl.int64), HALF, INTERLEAVED)
    src = X + b * stride_b + t * stride_t + heads[:, None] * stride_h
    x1 = tl.load(src + i1[None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + i2[None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)
    o1, o2 = rotate(x1, x2, cos[None, :], sin[None, :], INVERSE)
    dst = OUT + (bt * H + heads[:, None]) * (2 * HALF)
    tl.store(dst + i1[None, :], to_dtype(o1, OUT.dtype.element_ty), mask=mask)
    tl.store(dst + i2[None, :], to_dtype(o2, OUT.dtype.element_ty), mask=mask)


def head_tiles(heads: int, half: int) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_HALF): all pairs of a head, as many heads as fit MAX_TILE elements."""
    block_half = next_pow2(half)
    return min(next_pow2(heads), max(1, MAX_TILE // (2 * block_half))), block_half


def position_args(positions: torch.Tensor | None, seq: int, device: torch.device
                  ) -> tuple[torch.Tensor | None, int]:
    """(`[T]` or `[B, T]` positions as int64 on `device`, or None; its batch stride: 0 for one shared row)."""
    if positions is None:
        return None, 0
    positions = positions.to(device=device, dtype=torch.int64).contiguous()
    return positions, (seq if positions.dim() == 2 else 0)


def _rope(x: torch.Tensor, positions: torch.Tensor | None, offset: int, theta: float, inverse: bool,
          interleaved: bool) -> torch.Tensor:
    B, T, H, D = x.shape
    out = torch.empty((B, T, H, D), dtype=x.dtype, device=x.device)
    pos, stride_pb = position_args(positions, T, x.device)
    block_h, block_half = head_tiles(H, D // 2)
    if out.numel():
        _rope_kernel[(B * T, triton.cdiv(H, block_h))](
            x, out, x if pos is None else pos, inv_freq(D, float(theta), x.device), T, H, D // 2, offset,
            *x.stride(), stride_pb, HAS_POS=pos is not None, INVERSE=inverse, INTERLEAVED=interleaved,
            BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=num_warps(2 * block_h * block_half))
    return out


def rope(x: torch.Tensor, positions: torch.Tensor | None, offset: int, theta: float, inverse: bool) -> torch.Tensor:
    """x `[B, T, H, D]` (any strides) -> rotated copy, contiguous; NeoX rotate-half layout."""
    return _rope(x, positions, offset, theta, inverse, interleaved=False)


def rope_interleaved(x: torch.Tensor, positions: torch.Tensor | None, offset: int, theta: float,
                     inverse: bool) -> torch.Tensor:
    """As `rope`, GPT-J's interleaved layout (pairs of adjacent dims)."""
    return _rope(x, positions, offset, theta, inverse, interleaved=True)


KERNELS = {"rope": rope, "rope_interleaved": rope_interleaved}
