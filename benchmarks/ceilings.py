"""The card's ceilings, measured in the same run as the kernels: copy bandwidth and dense matmul FLOP/s.

Bandwidth: a device-to-device copy of a buffer far larger than the L2 (1 GiB on a GPU), counted as bytes read
plus bytes written. FLOP/s: an 8192³ bf16 matmul on a GPU (fp32 512³ on the CPU, as a rough scale only).
"""
from __future__ import annotations

import torch

from . import roofline
from .timing import time_fn


def measure(device: torch.device, warmup_ms: float | None = None, rep_ms: float | None = None) -> dict:
    gpu = device.type == "cuda"
    nbytes = 2**30 if gpu else 64 * 2**20
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    copy = time_fn(lambda i: dst.copy_(src), device, warmup_ms=warmup_ms, rep_ms=rep_ms)
    del src, dst
    n, dtype = (8192, torch.bfloat16) if gpu else (512, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm = time_fn(lambda i: a @ b, device, warmup_ms=warmup_ms, rep_ms=rep_ms)
    return {
        "copy_gbps": roofline.copy_bytes(nbytes) / (copy.median_ms * 1e-3) / 1e9,
        "copy_bytes": nbytes,
        "matmul_tflops": roofline.matmul_flops(n, n, n) / (mm.median_ms * 1e-3) / 1e12,
        "matmul_shape": [n, n, n],
        "matmul_dtype": str(dtype).removeprefix("torch."),
    }
