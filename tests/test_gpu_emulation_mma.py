"""The tensor-core layer of the GPU kernels (csrc/kernels/mma.cuh) under the CPU emulation: warp 32 runs NVIDIA's
mma.sync m16n8k16 fragment layouts, warp 64 AMD's MFMA 16x16x16 ones, and float operands the SIMT path. The test
kernel csrc/tests/mma_test_kernel.cu multiplies staged shared-memory tiles in all four operand orientations; the
products are checked against float64 (fp32 accumulation of exactly representable products: the error bound below
is K ulps of fp32 at the magnitude of the summed products), and the row reduction against the row sums."""
from __future__ import annotations

import ctypes

import pytest
import torch
from emulated_gpu import DTYPE_CODES, DTYPES, nan


def _run(gpu, dtype, a, b, a_trans, b_trans, threads):
    M, K = a.shape
    N = b.shape[1]
    held_a = (a.t() if a_trans else a).contiguous().to(dtype)
    held_b = (b.t() if b_trans else b).contiguous().to(dtype)
    c, row_sums = nan(M, N, dtype=torch.float32), nan(M, dtype=torch.float32)
    fn = gpu.olmo_fast_mma_test_gpu
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int] * 4 + [ctypes.c_void_p] * 2 + [ctypes.c_int] * 2 + [ctypes.c_void_p] * 2 + [
        ctypes.c_int]
    assert fn(DTYPE_CODES[dtype], M, N, K, held_a.data_ptr(), held_b.data_ptr(), int(a_trans), int(b_trans),
              c.data_ptr(), row_sums.data_ptr(), threads) == 0
    return c, row_sums


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("a_trans,b_trans", [(0, 0), (0, 1), (1, 0), (1, 1)])
@pytest.mark.parametrize("shape", [(16, 16, 16), (32, 48, 64)], ids=str)
def test_mma_layouts(gpu, dtype, a_trans, b_trans, shape):
    M, N, K = shape
    a, b = torch.randn(M, K).to(dtype), torch.randn(K, N).to(dtype)
    c, row_sums = _run(gpu, dtype, a, b, a_trans, b_trans, threads=128)
    ref = a.double() @ b.double()
    bound = K * torch.finfo(torch.float32).eps * (a.double().abs() @ b.double().abs())
    assert ((c.double() - ref).abs() <= bound).all(), (c.double() - ref).abs().max()
    ref_sums = ref[:, :16].sum(1)
    sum_bound = 2 * 16 * bound[:, :16].sum(1)
    assert ((row_sums.double() - ref_sums).abs() <= sum_bound).all()
