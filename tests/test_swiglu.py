"""SwiGLU kernels (OLMo's fused `[up | gate]` layout and the separate gate/up layout), forward + backward,
vs float64 PyTorch within flash-attention's rule (`conftest.assert_within_2x`: 2x the same-dtype torch error
+ a rounding slack), never NaN, NaN-poisoned kernel allocations, non-contiguous inputs and odd widths.
"""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, assert_within_2x, poisoned_allocations, require_kernel_where_registered

from olmo_fast import ops

BACKENDS = ["triton", "cpp"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (leading shape, H): one row, odd widths, a width over the kernel's 4096-column block
SHAPES = [((1,), 1), ((1,), 37), ((2, 3), 129), ((2,), 4100)]


def check(fn, inputs, dout, backend):
    def run(backend, *tensors):
        leaves = [t.detach().requires_grad_() for t in tensors[:-1]]
        out = fn(*leaves, backend=backend)
        return [out, *torch.autograd.grad(out, leaves, tensors[-1])]

    with poisoned_allocations():
        got = run(backend, *inputs, dout)
    same = run("torch", *inputs, dout)
    ref = run("torch", *(t.double() for t in (*inputs, dout)))
    for name, g, s, r in zip(("out", "grad 0", "grad 1"), got, same, ref):
        assert_within_2x(name, g, s, r)
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_swiglu_fused_layout(backend, dtype, shape):
    require_kernel_where_registered("swiglu_fwd", backend)
    lead, H = shape
    h = (3 * torch.randn(*lead, 2 * H + 3, device=DEVICE))[..., 1:2 * H + 1].to(dtype)  # strided rows
    dout = torch.randn(H, *lead, device=DEVICE).movedim(0, -1).to(dtype)  # transposed gradient
    check(ops.swiglu, (h,), dout, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
def test_silu_mul_separate_layout(backend, dtype, shape):
    require_kernel_where_registered("silu_mul_fwd", backend)
    lead, H = shape
    gate = (3 * torch.randn(H, *lead, device=DEVICE)).movedim(0, -1).to(dtype)  # transposed
    up = torch.randn(*lead, H + 2, device=DEVICE)[..., 2:].to(dtype)  # sliced
    dout = torch.randn(*lead, H, device=DEVICE).to(dtype)
    check(ops.silu_mul, (gate, up), dout, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's numpy exp -> inf: intended
def test_swiglu_extreme_gates(backend):
    """Gates far in both tails (sigmoid saturates, exp overflows in a naive formula): finite, exact limits."""
    require_kernel_where_registered("swiglu_fwd", backend)
    gate = torch.tensor([[-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4]], device=DEVICE)
    h = torch.cat((torch.ones_like(gate), gate), dim=-1).requires_grad_()
    out = ops.swiglu(h, backend=backend)
    (dh,) = torch.autograd.grad(out.sum(), h)
    ref_h = h.detach().double().requires_grad_()
    ref = ops.swiglu(ref_h, backend="torch")
    (ref_dh,) = torch.autograd.grad(ref.sum(), ref_h)
    assert torch.isfinite(out).all() and torch.isfinite(dh).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-30)
    torch.testing.assert_close(dh.double(), ref_dh, rtol=1e-6, atol=1e-30)


def test_odd_width_rejected():
    with pytest.raises(ValueError, match="even"):
        ops.swiglu(torch.randn(2, 5), backend="torch")
