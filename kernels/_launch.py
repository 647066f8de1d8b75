"""Launch helpers shared by the Triton kernels: block sizes, warps from the warp size, and `to_dtype`, the
one device-side helper every kernel stores its outputs through.

Warps: a CTA holds at most 1024 threads on both vendors; NVIDIA warps are 32 lanes, AMD wavefronts 64, so
`num_warps * warp_size <= 1024` (num_warps=32 fails to launch on MI250X: Liger-Kernel#231).
(The ops reshape `[..., C]` inputs to 2-D row views before calling a kernel: `olmo_fast.ops._library.as_rows`.)
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import _tuning

# The interpreter (TRITON_INTERPRET=1, CPU tests) truncates fp32 -> bf16 instead of rounding to nearest even
# (triton 3.9 `cast_impl`), doubling bf16 output error; there `to_dtype` rounds with integer ops instead.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")

MAX_THREADS = 1024
ELEMENTS_PER_THREAD = 8  # 16-byte vectors at 16-bit, two at fp32: enough bytes in flight per thread
MAX_FUSED = 16384  # longest row handled in one block; longer rows loop over chunks of this size


def warp_size() -> int:
    """Lanes of a warp / wavefront of the target kernels are built for (`_tuning.current()`)."""
    return _tuning.current().warp_size


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def row_block(cols: int) -> tuple[int, bool]:
    """`(BLOCK, SINGLE_PASS)` for rows of `cols` elements: the whole row in one block when it fits MAX_FUSED,
    else chunks of MAX_FUSED looped over."""
    block, limit = next_pow2(max(cols, 16)), next_pow2(MAX_FUSED)
    return (block, True) if block <= limit else (limit, False)


def persistent_programs(rows: int, device: torch.device) -> int:
    """Programs for a kernel that loops over rows (to reduce per-program partial sums): a few per SM."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    return max(1, min(rows, 4 * sms))


def num_warps(block_elements: int) -> int:
    """Warps for a block of `block_elements` elements, ~ELEMENTS_PER_THREAD each, within 1024 threads."""
    ws = warp_size()
    warps = block_elements // (ws * ELEMENTS_PER_THREAD)
    return max(1, min(next_pow2(max(warps, 1)), 16, MAX_THREADS // ws))


@triton.jit
def to_dtype(x, dtype: tl.constexpr):
    """fp32 `x` -> `dtype`, rounding to nearest even (as the GPU's conversion does)."""
    if INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
