"""torch.clamp(x, -clip, clip) and its gradient on the device, for every kernel that clips (OLMo 1.7's clip_qkv):
kernels/qkv_rope.py and kernels/attention.py. The rule itself is `olmo_fast.ops.clip_qkv` (what the "torch"
backend and the patched models run); this file mirrors it in Triton, and tests/test_qkv_rope.py checks that the
two agree bitwise at the edges.

Exactly torch.clamp's semantics: the bound is the clip value rounded to the input's dtype (`clip_bound`, on the
host; torch compares in the tensor's dtype), NaN propagates through the clamp (tl.maximum/minimum drop a NaN
operand on a GPU unless told to propagate it), and the gradient passes where -bound <= x <= bound (inclusive; NaN
blocks it). No memory traffic of its own: it acts on tiles already loaded.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._launch import INTERPRETED


@functools.lru_cache(maxsize=64)
def clip_bound(clip: float | None, dtype: torch.dtype) -> float:
    """The clip value rounded to `dtype` (what torch.clamp compares against); 0 when unused.
    Cached: it builds a host tensor, and every call of a clipping kernel asks for it."""
    return 0.0 if clip is None else float(torch.tensor(float(clip), dtype=dtype))


@triton.jit
def clamp(x, clip, HAS_CLIP: tl.constexpr):
    """c(x) = min(max(x, -clip), clip) in x's own dtype, NaN kept; `clip` from `clip_bound` for the input dtype, so
    the result is exact in any dtype x is held in. Native 16-bit min/max keep a tile in half the registers of an
    fp32 round trip (attention's dK/dV kernel clamps a query tile per step); the interpreter, whose bf16 compares
    are wrong, goes through fp32. The cast back keeps x's dtype on triton 3.6, whose bf16 minimum/maximum return
    fp32 (3.9 keeps bf16; the cast is then a no-op)."""
    if HAS_CLIP:
        if INTERPRETED:
            xf = tl.maximum(x.to(tl.float32), -clip, tl.PropagateNan.ALL)
            x = tl.minimum(xf, clip, tl.PropagateNan.ALL).to(x.dtype)
        else:
            c = clip.to(x.dtype)
            x = tl.minimum(tl.maximum(x, -c, tl.PropagateNan.ALL), c, tl.PropagateNan.ALL).to(x.dtype)
    return x


@triton.jit
def clamp_grad(g, x, clip, HAS_CLIP: tl.constexpr):
    """torch.clamp's backward: g where -clip <= x <= clip (inclusive), 0 elsewhere and where x is NaN."""
    if HAS_CLIP:
        xf = x.to(tl.float32)
        g = tl.where((xf >= -clip) & (xf <= clip), g, 0.0)
    return g
