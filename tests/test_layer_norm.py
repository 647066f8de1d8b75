"""LayerNorm / RMSNorm kernels (forward + backward, fused residual, weight/bias, long rows) vs float64 PyTorch.

Rule (flash-attention's, `conftest.assert_within_2x`): max |kernel - f64| <= 2 * max |torch same dtype - f64|
+ a rounding slack (the dtype's at 0.3, at least 4 fp32 ulps, scaled to the magnitude), for y, h, dx, dresidual,
dweight, dbias; never NaN. "torch same
dtype" is the "torch" backend (`ops.reference`, fp32 statistics) on the same low-precision inputs. Kernel
allocations are NaN-poisoned. Inputs are non-contiguous (row-strided slices, transposed views), rows are odd
lengths (not multiples of the block), and one case is a single row; `long_rows` forces the looped variant.
"""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, assert_within_2x, poisoned_allocations, require_kernel_where_registered

from olmo_fast import ops

BACKENDS = ["triton", "cpp"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (leading shape, C, layout)
CASES = [((1,), 37, "sliced"), ((3, 5), 77, "sliced"), ((9,), 130, "transposed")]
VARIANTS = {  # name -> (rms, has_weight, has_bias)
    "layer_norm": (False, False, False), "layer_norm_affine": (False, True, True),
    "layer_norm_bias": (False, False, True), "rms_norm": (True, False, False), "rms_norm_weight": (True, True, False),
}


# The autograd node of the "cpp" backend's non-parametric LayerNorm in plain eager calls (csrc/bindings.cpp)
CPP_NODE = "LayerNormFunction"


def kernel_name(rms: bool, weight: bool, bias: bool) -> str:
    return "norm_fwd" if rms or weight or bias else "layer_norm_fwd"


def make(lead, C, layout, dtype, scale=1.0, shift=0.0):
    """N(shift, scale) values in a non-contiguous `[*lead, C]` view."""
    if layout == "sliced":  # rows strided by C + 5: a slice of a wider buffer
        t = torch.randn(*lead, C + 5, device=DEVICE)[..., 2:C + 2]
    else:  # unit stride along the rows: the view must be copied to rows, never read wrongly
        t = torch.randn(C, *lead, device=DEVICE).movedim(0, -1)
    return (t * scale + shift).to(dtype)


def run(x, residual, weight, bias, dy, dh, rms, backend, eps):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, residual, weight, bias)]
    x, residual, weight, bias = leaves
    if rms:
        out = ops.rms_norm(x, weight, eps=eps, residual=residual, backend=backend)
    else:
        out = ops.layer_norm(x, eps=eps, residual=residual, weight=weight, bias=bias, backend=backend)
    outs, grads_out = ((out,), (dy,)) if residual is None else (out, (dy, dh))
    inputs = [t for t in leaves if t is not None]
    return list(outs) + list(torch.autograd.grad(outs, inputs, grads_out))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}")
def test_against_float64(backend, dtype, variant, residual, case):
    rms, has_weight, has_bias = VARIANTS[variant]
    require_kernel_where_registered(kernel_name(rms, has_weight, has_bias), backend)
    lead, C, layout = case
    x = make(lead, C, layout, dtype, scale=2.0, shift=0.5)  # a mean and a spread for the statistics to remove
    r = make(lead, C, layout, dtype) if residual else None
    w = (1 + 0.5 * torch.randn(C, device=DEVICE)).to(dtype) if has_weight else None
    b = torch.randn(C, device=DEVICE).to(dtype) if has_bias else None
    dy, dh = make(lead, C, "sliced", dtype), make(lead, C, "sliced", dtype)
    eps = 1e-6 if rms else 1e-5
    with poisoned_allocations():
        got = run(x, r, w, b, dy, dh, rms, backend, eps)
    same = run(x, r, w, b, dy, dh, rms, "torch", eps)
    f64 = [None if t is None else t.double() for t in (x, r, w, b, dy, dh)]
    ref = run(*f64, rms, "torch", eps)
    for i, (g, s, f) in enumerate(zip(got, same, ref)):
        assert_within_2x(f"{variant} output/grad #{i}", g, s, f)
    if backend == "cpp" and variant == "layer_norm":  # what was checked is the extension's op and C++ node
        assert CPP_NODE in got[0].grad_fn.name()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["layer_norm", "layer_norm_affine", "rms_norm_weight"])
def test_long_rows_loop(backend, variant, monkeypatch):
    """Rows longer than the fused block take the looped path (chunked Welford statistics, second read)."""
    rms, has_weight, has_bias = VARIANTS[variant]
    require_kernel_where_registered(kernel_name(rms, has_weight, has_bias), backend)
    from olmo_fast.kernels import _launch

    monkeypatch.setattr(_launch, "MAX_FUSED", 32)
    lead, C = (4,), 100  # 4 chunks, the last one partial
    x, r, dy, dh = (make(lead, C, "sliced", torch.float32, 3.0, 10.0) for _ in range(4))  # large mean: stability
    w = torch.randn(C, device=DEVICE) if has_weight else None
    b = torch.randn(C, device=DEVICE) if has_bias else None
    with poisoned_allocations():
        got = run(x, r, w, b, dy, dh, rms, backend, 1e-5)
    same = run(x, r, w, b, dy, dh, rms, "torch", 1e-5)
    ref = run(*[None if t is None else t.double() for t in (x, r, w, b, dy, dh)], rms, "torch", 1e-5)
    for i, (g, s, f) in enumerate(zip(got, same, ref)):
        assert_within_2x(f"{variant} long rows #{i}", g, s, f)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_keeps_output_not_input(backend):
    """OLMo's LayerNorm saves y and rstd for its backward: neither x nor the residual stays alive."""
    require_kernel_where_registered("layer_norm_fwd", backend)
    x = torch.randn(6, 40, device=DEVICE, requires_grad=True)
    r = torch.randn(6, 40, device=DEVICE, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y, h = ops.layer_norm(x, residual=r, backend=backend)
    assert saved and all(t.data_ptr() not in (x.data_ptr(), r.data_ptr(), h.data_ptr()) for t in saved)
    assert any(t.data_ptr() == y.data_ptr() for t in saved)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_refuses_an_output_changed_in_place(backend):
    """The saved y is y's storage: changing y in place after the forward must fail the backward, not feed it."""
    require_kernel_where_registered("layer_norm_fwd", backend)
    x = torch.randn(5, 33, device=DEVICE, requires_grad=True)
    y = ops.layer_norm(x, backend=backend)
    with torch.no_grad():
        y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(y.sum(), x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs(backend):
    require_kernel_where_registered("norm_fwd", backend)
    x = torch.randn(3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="residual"):
        ops.layer_norm(x, residual=torch.randn(3, 7, device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match="weight"):
        ops.rms_norm(x, torch.randn(7, device=DEVICE), backend=backend)
    y, h = ops.layer_norm(x.half(), residual=x, backend=backend)  # x + residual promotes, as in PyTorch
    assert y.dtype == h.dtype == torch.float32
    torch.testing.assert_close(h, x.half().float() + x, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["layer_norm_affine", "rms_norm_weight"])
def test_no_rows_give_zero_parameter_gradients(backend, variant):
    """An empty batch (0 rows) with a weight (and bias): dweight and dbias are exactly 0, as PyTorch's, not sums of
    a partial-sum buffer that no program wrote (allocations NaN-poisoned)."""
    rms, has_weight, has_bias = VARIANTS[variant]
    require_kernel_where_registered("norm_bwd", backend)
    C = 37
    x, dy = torch.randn(0, C, device=DEVICE), torch.randn(0, C, device=DEVICE)
    weight = torch.randn(C, device=DEVICE)
    bias = torch.randn(C, device=DEVICE) if has_bias else None
    with poisoned_allocations():
        dx, *dparams = run(x, None, weight, bias, dy, None, rms, backend, 1e-5)[1:]
    assert dx.shape == (0, C) and len(dparams) == 1 + has_bias
    for grad in dparams:
        assert grad.shape == (C,) and torch.equal(grad, torch.zeros(C, device=DEVICE))


@pytest.mark.parametrize("used", ["y", "h"])
def test_cpp_node_with_one_output_used(used):
    """Only y or only h of the fused residual LayerNorm reaches the loss: the C++ node gets no gradient for the other
    (not zeros) and x's and the residual's gradients still match float64."""
    require_kernel_where_registered("layer_norm", "cpp")
    x, r, d = (make((2, 3), 45, "sliced", torch.bfloat16) for _ in range(3))

    def grads(x, r, d, backend):
        x, r = x.detach().requires_grad_(), r.detach().requires_grad_()
        y, h = ops.layer_norm(x, residual=r, backend=backend)
        return torch.autograd.grad(y if used == "y" else h, (x, r), d)

    got = grads(x, r, d, "cpp")
    same = grads(x, r, d, "torch")
    ref = grads(x.double(), r.double(), d.double(), "torch")
    for i, (g, s, f) in enumerate(zip(got, same, ref)):
        assert_within_2x(f"only {used}: grad #{i}", g, s, f)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_cpp_no_grad_call(residual):
    """Without autograd (no_grad, or no input needing a gradient) the C++ op runs its kernel alone: no node, the same
    values as with one."""
    require_kernel_where_registered("layer_norm", "cpp")
    x, r = make((5,), 33, "transposed", torch.float16), make((5,), 33, "sliced", torch.float16)
    res, leaf = r if residual else None, x.detach().requires_grad_()

    def outputs(out):
        return list(out) if residual else [out]

    with_node = outputs(ops.layer_norm(leaf, residual=res, backend="cpp"))
    with torch.no_grad():
        no_grad = outputs(ops.layer_norm(leaf, residual=res, backend="cpp"))
    plain = outputs(ops.layer_norm(x, residual=res, backend="cpp"))
    for a, b, c in zip(with_node, no_grad, plain):
        assert b.grad_fn is None and c.grad_fn is None and CPP_NODE in a.grad_fn.name()
        assert torch.equal(a.detach(), b) and torch.equal(a.detach(), c)


def test_cpp_node_has_no_double_backward():
    require_kernel_where_registered("layer_norm", "cpp")
    x = torch.randn(3, 10, device=DEVICE, requires_grad=True)
    y = ops.layer_norm(x, backend="cpp")
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)


def test_compiled_call_traces_the_custom_op_not_the_cpp_node():
    """Under torch.compile the "cpp" LayerNorm is the traceable custom op olmo_fast::norm_fwd (with its registered
    autograd), never the extension's op with the C++ node; values and gradients equal the eager call's."""
    require_kernel_where_registered("layer_norm", "cpp")
    torch._dynamo.reset()
    targets = []

    def record(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    def run(fn):
        x, r = make((2, 3), 21, "sliced", torch.float32), make((2, 3), 21, "sliced", torch.float32)
        x, r = x.requires_grad_(), r.requires_grad_()
        y, h = fn(x, r)
        return [y, h, *torch.autograd.grad((y * h).sum(), (x, r))]

    def norm(x, r):
        return ops.layer_norm(x, residual=r, backend="cpp")

    torch.manual_seed(1)
    eager = run(norm)
    torch.manual_seed(1)
    compiled = run(torch.compile(norm, backend=record, fullgraph=True))
    assert "olmo_fast.norm_fwd" in str(targets) and "olmo_fast_C" not in str(targets), targets
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=0, atol=0)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_cpp_op_opcheck(residual):
    """The extension's ops: schema, fake kernel, autograd registration and tracing agree with the real kernels."""
    require_kernel_where_registered("layer_norm", "cpp")
    x = make((4,), 24, "sliced", torch.bfloat16).requires_grad_()
    if residual:
        r = make((4,), 24, "sliced", torch.bfloat16).requires_grad_()
        torch.library.opcheck(torch.ops.olmo_fast_C.layer_norm_residual, (x, r, 1e-5))
    else:
        torch.library.opcheck(torch.ops.olmo_fast_C.layer_norm, (x, 1e-5))
