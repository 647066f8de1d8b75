"""The card's ceilings, measured in the same run as the kernels: copy bandwidth and dense matmul FLOP/s.

Bandwidth: a device-to-device copy of a buffer far larger than the L2 (1 GiB on a GPU), counted as bytes read
plus bytes written. FLOP/s: an 8192³ bf16 matmul on a GPU (fp32 512³ on the CPU, as a rough scale only).
"""
from __future__ import annotations

import torch

from . import roofline
from .timing import time_fn


def copy_gbps(device: torch.device, nbytes: int, warmup_ms: float | None = None, rep_ms: float | None = None) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    t = time_fn(lambda i: dst.copy_(src), device, warmup_ms=warmup_ms, rep_ms=rep_ms)
    return roofline.copy_bytes(nbytes) / (t.median_ms * 1e-3) / 1e9


def matmul_tflops(device: torch.device, n: int, dtype: torch.dtype, warmup_ms: float | None = None,
                  rep_ms: float | None = None) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_fn(lambda i: a @ b, device, warmup_ms=warmup_ms, rep_ms=rep_ms)
    return roofline.matmul_flops(n, n, n) / (t.median_ms * 1e-3) / 1e12


def measure(device: torch.device, warmup_ms: float | None = None, rep_ms: float | None = None) -> dict:
    gpu = device.type == "cuda"
    nbytes = 2**30 if gpu else 64 * 2**20
    n, dtype = (8192, torch.bfloat16) if gpu else (512, torch.float32)
    return {
        "copy_gbps": copy_gbps(device, nbytes, warmup_ms, rep_ms),
        "copy_bytes": nbytes,
        "matmul_tflops": matmul_tflops(device, n, dtype, warmup_ms, rep_ms),
        "matmul_shape": [n, n, n],
        "matmul_dtype": str(dtype).removeprefix("torch."),
    }
