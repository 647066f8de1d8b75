"""OLMo 2's post-norm residual `ops.rms_norm_add` (norm, then add: `residual + (w * x * rstd).to(x.dtype)`) on the
compiled backends vs float64 PyTorch, forward and backward (d x, d weight, d residual).

Rule (flash-attention's, `conftest.assert_within_2x`): max |kernel - f64| <= 2 * max |torch same dtype - f64|
+ a rounding slack, never NaN, where "torch same dtype" is the "torch" backend (`reference.rms_norm_add`, which
tests/test_olmo2_reference.py checks bit for bit against transformers' Olmo2RMSNorm) on the same inputs. Kernel
allocations are NaN-poisoned; inputs are row-strided slices or transposed views, rows of odd widths (100, 1000),
a batch of one row, an empty batch, with and without a weight, and the autocast mix (bf16 branch, fp32 residual).
"""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, assert_within_2x, poisoned_allocations, require_kernel_where_registered
from test_layer_norm import make

from olmo_fast import ops

BACKENDS = ["triton", "cpp"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CASES = [((1,), 100, "sliced"), ((2, 3), 1000, "sliced"), ((9,), 130, "transposed")]  # (leading shape, C, layout)


def run(x, weight, residual, dout, backend, eps=1e-6):
    """-> [out, dx, (dweight,) dresidual] of `ops.rms_norm_add`."""
    leaves = [t if t is None else t.detach().requires_grad_() for t in (x, weight, residual)]
    out = ops.rms_norm_add(leaves[0], leaves[1], leaves[2], eps=eps, backend=backend)
    inputs = [t for t in leaves if t is not None]
    return [out, *torch.autograd.grad(out, inputs, dout)]


def check(name, x, weight, residual, dout, backend):
    with poisoned_allocations():
        got = run(x, weight, residual, dout, backend)
    same = run(x, weight, residual, dout, "torch")
    ref = run(*(t if t is None else t.double() for t in (x, weight, residual, dout)), "torch")
    assert len(got) == len(same) == len(ref)
    for what, g, s, f in zip(("out", "dx", "dweight" if weight is not None else "dresidual", "dresidual"),
                             got, same, ref):
        assert_within_2x(f"{name} {what}", g, s, f)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("has_weight", [True, False], ids=["weight", "no_weight"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}")
def test_against_float64(backend, dtype, has_weight, case):
    require_kernel_where_registered("rms_norm_add_fwd", backend)
    lead, C, layout = case
    x = make(lead, C, layout, dtype, scale=3.0, shift=0.5)
    residual = make(lead, C, layout, dtype, scale=4.0)  # the residual stream: larger than the branch
    weight = (1 + 0.5 * torch.randn(2 * C, device=DEVICE)).to(dtype)[::2] if has_weight else None  # strided
    dout = make(lead, C, "sliced", dtype)
    check(f"{dtype}", x, weight, residual, dout, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_mix_rounds_the_norm_to_x_dtype(backend):
    """Under bf16 autocast the branch output x is bf16 and the residual stream fp32: the norm is rounded to bf16,
    then added in fp32 (out fp32); dx comes back in bf16, d residual in fp32, d weight in the weight's fp32."""
    require_kernel_where_registered("rms_norm_add_fwd", backend)
    x = make((5,), 100, "sliced", torch.bfloat16, scale=2.0)
    residual = make((5,), 100, "sliced", torch.float32, scale=4.0)
    weight = 1 + 0.5 * torch.randn(100, device=DEVICE)
    dout = make((5,), 100, "sliced", torch.float32)
    out = ops.rms_norm_add(x, weight, residual, backend=backend)
    assert out.dtype == torch.float32
    alone = ops.rms_norm_add(x, weight, torch.zeros_like(residual), backend=backend)  # = the rounded norm itself
    assert torch.equal(alone, alone.bfloat16().float()) and not torch.equal(alone, x.float())
    check("autocast mix", x, weight, residual, dout, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_rows_loop(backend, monkeypatch):
    """Rows longer than the fused block take the looped path (statistics pass, then a second read)."""
    require_kernel_where_registered("rms_norm_add_fwd", backend)
    from olmo_fast.kernels import _launch

    monkeypatch.setattr(_launch, "MAX_FUSED", 32)
    x, residual, dout = (make((4,), 100, "sliced", torch.float32, 3.0, 1.0) for _ in range(3))  # 4 chunks, ragged
    check("long rows", x, torch.randn(100, device=DEVICE), residual, dout, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    """No rows: empty outputs, and a weight gradient of exactly 0 (no partial sums left unwritten)."""
    require_kernel_where_registered("rms_norm_add_fwd", backend)
    C = 37
    x, residual, dout = (torch.randn(0, C, device=DEVICE) for _ in range(3))
    with poisoned_allocations():
        out, dx, dweight, dresidual = run(x, torch.randn(C, device=DEVICE), residual, dout, backend)
    assert out.shape == dx.shape == dresidual.shape == (0, C)
    assert torch.equal(dweight, torch.zeros(C, device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiles_fullgraph(backend):
    """torch.compile traces the custom ops (fake + autograd) without a graph break and matches eager."""
    require_kernel_where_registered("rms_norm_add_fwd", backend)
    torch._dynamo.reset()
    x, residual, weight = torch.randn(3, 40), torch.randn(3, 40), torch.randn(40)
    dout = torch.randn(3, 40)

    def step(x, weight, residual):
        return ops.rms_norm_add(x, weight, residual, backend=backend)

    eager = run(x, weight, residual, dout, backend)
    leaves = [t.detach().requires_grad_() for t in (x, weight, residual)]
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(*leaves)
    compiled = [out, *torch.autograd.grad(out, leaves, dout)]
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs(backend):
    require_kernel_where_registered("rms_norm_add_fwd", backend)
    x = torch.randn(3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="residual"):
        ops.rms_norm_add(x, None, torch.randn(3, 7, device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match="weight"):
        ops.rms_norm_add(x, torch.randn(7, device=DEVICE), x, backend=backend)


def test_cpp_schemas_and_fake_kernels():
    """The C++ kernels' schemas and fake (meta) kernels agree with the real ones (torch.library.opcheck), same
    dtype and the autocast mix, with and without a weight."""
    require_kernel_where_registered("rms_norm_add_fwd", "cpp", "cpu")
    cpp = torch.ops.olmo_fast_C
    x, residual = torch.randn(4, 24, dtype=torch.bfloat16), torch.randn(4, 30, dtype=torch.bfloat16)[:, 3:27]
    weight = torch.randn(24, dtype=torch.bfloat16)
    out, rstd = cpp.rms_norm_add_fwd(x, weight, residual, 1e-6)
    cases = {
        cpp.rms_norm_add_fwd: [(x, weight, residual, 1e-6), (x, None, residual.float(), 1e-6)],
        cpp.rms_norm_add_bwd: [(out, x, weight, rstd), (out.float(), x, None, rstd)],
    }
    for op, arg_sets in cases.items():
        for args in arg_sets:
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
