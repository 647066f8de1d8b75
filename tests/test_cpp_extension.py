"""The compiled extension olmo_fast._C itself (the "cpp" backend's kernels, called directly, no autograd):
it loads and registers torch.ops.olmo_fast_C.* with fake kernels (opcheck), rejects bad input with clear
messages, and computes every op within flash-attention's rule (`conftest.assert_within_2x`: error vs float64
<= 2x plain PyTorch's in the same dtype + a rounding slack) on shapes that take the scalar/tail paths of the
vectorised loops: odd widths, rows offset by one element (unaligned), strided rows, a transposed last dim,
one row, no rows. Outputs are NaN-poisoned inside the extension (poison_outputs) so unwritten elements fail.
The ops/ tests (test_layer_norm.py, test_swiglu.py, test_rope.py) cover the same kernels through autograd.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, assert_within_2x, require_kernel

from olmo_fast.ops import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OPS = ("layer_norm_fwd", "layer_norm_bwd", "norm_fwd", "norm_bwd", "swiglu_fwd", "swiglu_bwd", "silu_mul_fwd",
       "silu_mul_bwd", "rope", "rope_interleaved")


@pytest.fixture(autouse=True)
def cpp():
    """torch.ops.olmo_fast_C with output poisoning on (skipped, or failed under CI, where it is not built)."""
    require_kernel("layer_norm_fwd", "cpp")
    ops = torch.ops.olmo_fast_C
    ops.poison_outputs(True)
    yield ops
    ops.poison_outputs(False)


def rows(n: int, c: int, dtype: torch.dtype, layout: str, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    """[n, c] in one of the layouts the kernels must handle."""
    if layout == "contiguous":
        t = torch.randn(n, c, device=DEVICE)
    elif layout == "unaligned":  # data pointer one element past a 16-byte boundary, row stride c + 1
        t = torch.randn(n, c + 1, device=DEVICE)[:, 1:]
    elif layout == "strided":  # rows 8 elements apart beyond their width (aligned, but not contiguous)
        t = torch.randn(n, c + 8, device=DEVICE)[:, :c]
    else:  # "transposed": last-dim stride n (the binding copies it)
        t = torch.randn(c, n, device=DEVICE).t()
    return (t * scale + shift).to(dtype)


LAYOUTS = ["contiguous", "unaligned", "strided", "transposed"]
# (rows, width): one row, odd widths (not a multiple of the 16-lane / 16-byte blocks), a wide row
SHAPES = [(1, 7), (5, 33), (17, 129), (3, 1000)]


def test_loads_and_registers(cpp):
    from olmo_fast import _C  # noqa: F401
    from olmo_fast.build_info import build_info
    from olmo_fast.ops import _cpp_kernels, dispatch

    for op in OPS:
        assert hasattr(cpp, op), op
        assert dispatch.kernel(op, "cpp", "cpu") is _cpp_kernels.KERNELS[op]
    assert cpp.gpu_runtime() in ("none", "cuda", "hip")
    assert ("cuda" in _cpp_kernels.DEVICES) == (cpp.gpu_runtime() != "none")
    info = build_info()
    assert info["built"] and info["gpu"] == cpp.gpu_runtime(), info


def test_opcheck_fake_kernels(cpp):
    """Schemas, fake (meta) kernels and real kernels agree (torch.library.opcheck), as torch.compile needs."""
    x, r = rows(4, 24, torch.bfloat16, "contiguous"), rows(4, 24, torch.bfloat16, "unaligned")
    y, h, rstd = cpp.layer_norm_fwd(x, r, 1e-5)
    q = torch.randn(2, 5, 3, 8, device=DEVICE)
    w, b = x[0], r[1]
    _, _, mean, rstd_affine = cpp.norm_fwd(x, None, w, b, 1e-5, False)
    cases = {
        cpp.layer_norm_fwd: [(x, r, 1e-5), (x, None, 1e-5)],
        cpp.layer_norm_bwd: [(x, y, rstd, None), (x, y, rstd, r)],
        cpp.norm_fwd: [(x, r, w, b, 1e-5, False), (x, None, w, None, 1e-6, True), (x, r, None, None, 1e-6, True)],
        cpp.norm_bwd: [(x, h, w, mean, rstd_affine, r, True, False), (x, y, None, None, rstd, None, False, True)],
        cpp.swiglu_fwd: [(x,)],
        cpp.swiglu_bwd: [(x[:, :12], x)],
        cpp.silu_mul_fwd: [(x, r)],
        cpp.silu_mul_bwd: [(x, r, y)],
        cpp.rope: [(q, None, 3, 10000.0, False), (q, torch.arange(5, device=DEVICE), 0, 500.0, True)],
        cpp.rope_interleaved: [(q, None, 0, 10000.0, False)],
    }
    for op, arg_sets in cases.items():
        for args in arg_sets:
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_layer_norm(cpp, dtype, layout, shape):
    n, c = shape
    x, residual = rows(n, c, dtype, layout, 3.0, 5.0), rows(n, c, dtype, LAYOUTS[-1 - LAYOUTS.index(layout)])
    dy, dh = rows(n, c, dtype, layout), rows(n, c, dtype, "unaligned")
    for res, dh_ in ((None, None), (residual, dh)):
        y, h, rstd = cpp.layer_norm_fwd(x, res, 1e-5)
        h_ref = x if res is None else x + res  # the sum, rounded to the dtype: bitwise what the kernel writes
        if res is None:
            assert h is None
        else:
            assert torch.equal(h, h_ref)
        h64 = h_ref.double().requires_grad_()
        y64 = F.layer_norm(h64, (c,), eps=1e-5)
        assert_within_2x("y", y, reference.layer_norm(h_ref, 1e-5), y64.detach())
        rstd64 = (h64.detach().var(-1, unbiased=False) + 1e-5).rsqrt()
        torch.testing.assert_close(rstd, rstd64.float(), rtol=1e-5, atol=0)
        # backward from (y, rstd) vs float64 autograd, and torch's same-dtype autograd
        (dx64,) = torch.autograd.grad(y64, h64, dy.double())
        h_same = h_ref.detach().requires_grad_()
        (dx_same,) = torch.autograd.grad(reference.layer_norm(h_same, 1e-5), h_same, dy)
        dx = cpp.layer_norm_bwd(dy, y, rstd, dh_)
        if dh_ is not None:
            dx64, dx_same = dx64 + dh_.double(), dx_same + dh_
        assert_within_2x("dx", dx, dx_same, dx64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_affine_norm_weight_grads_over_many_rows(cpp, dtype, rms):
    """Weight/bias gradients summed over more rows than the CPU's 32 fp32 accumulator rows (several rows each),
    vs float64 autograd; the same bits whatever the thread count."""
    n, c = 203, 67
    x, dy = rows(n, c, dtype, "unaligned", 2.0, 0.5), rows(n, c, dtype, "strided")
    w, b = (1 + 0.5 * torch.randn(c, device=DEVICE)).to(dtype), torch.randn(c, device=DEVICE).to(dtype)
    bias = None if rms else b
    y, _, mean, rstd = cpp.norm_fwd(x, None, w, bias, 1e-5, rms)
    got = (y, *cpp.norm_bwd(dy, x, w, mean, rstd, None, bias is not None, rms))

    def torch_run(x, w, b, dy):
        leaves = [t.detach().requires_grad_() for t in (x, w, b) if t is not None]
        out = F.rms_norm(leaves[0], (c,), leaves[1], 1e-5) if rms else F.layer_norm(leaves[0], (c,), *leaves[1:], 1e-5)
        return (out, *torch.autograd.grad(out, leaves, dy))

    same, ref = torch_run(x, w, bias, dy), torch_run(x.double(), w.double(), None if rms else b.double(), dy.double())
    for name, g, s, r in zip(("y", "dx", "dweight", "dbias"), got, same, ref):
        assert_within_2x(name, g.to(s.dtype), s, r)  # weight grads come in fp32
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        again = cpp.norm_bwd(dy, x, w, mean, rstd, None, bias is not None, rms)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(again, got[1:]) if a is not None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_silu_mul_and_fused_swiglu(cpp, dtype, layout, shape):
    n, H = shape
    gate, up, dout = rows(n, H, dtype, layout, 4.0), rows(n, H, dtype, "unaligned"), rows(n, H, dtype, layout)

    def grads(g, u, d):
        g, u = g.detach().requires_grad_(), u.detach().requires_grad_()
        out = F.silu(g) * u
        return (out, *torch.autograd.grad(out, (g, u), d))

    same, ref = grads(gate, up, dout), grads(gate.double(), up.double(), dout.double())
    got = (cpp.silu_mul_fwd(gate, up), *cpp.silu_mul_bwd(dout, gate, up))
    for name, g, s, r in zip(("out", "d_gate", "d_up"), got, same, ref):
        assert_within_2x(name, g, s, r)
    # the fused [up | gate] layout: the same math on the two halves of one (here row-strided) tensor
    h = torch.cat((up, gate), dim=1)
    h = torch.cat((h, h[:, :3]), dim=1)[:, : 2 * H] if layout != "contiguous" else h
    assert torch.equal(cpp.swiglu_fwd(h), got[0])
    assert torch.equal(cpp.swiglu_bwd(dout, h), torch.cat((got[2], got[1]), dim=1))


def rope64(x: torch.Tensor, positions: torch.Tensor, theta: float, interleaved: bool, inverse: bool) -> torch.Tensor:
    """float64 rotation (angles from float64 inverse frequencies) of x [B, T, H, D] at positions [B or 1, T]."""
    D = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, D, 2, dtype=torch.float64, device=x.device) / D)
    angle = positions.double()[..., None, None] * inv_freq * (-1 if inverse else 1)  # [B, T, 1, D/2]
    x = x.double()
    x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleaved else x.chunk(2, dim=-1)
    o1, o2 = x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()
    return torch.stack((o1, o2), dim=-1).flatten(-2) if interleaved else torch.cat((o1, o2), dim=-1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "unaligned", "transposed"])
@pytest.mark.parametrize("where", ["offset", "positions[T]", "positions[B,T]"])
def test_rope(cpp, dtype, layout, where):
    B, T, H, D = 2, 37, 3, 48
    base = torch.randn(B, T, H, D + 1, device=DEVICE)
    x = {"contiguous": base[..., :D].contiguous(), "unaligned": base[..., 1:],
         "transposed": base[..., :D].transpose(1, 2).contiguous().transpose(1, 2)}[layout].to(dtype)
    offset = 2040
    positions = {"offset": None, "positions[T]": torch.randint(0, 4096, (T,), device=DEVICE),
                 "positions[B,T]": torch.randint(0, 4096, (B, T), device=DEVICE)}[where]
    pos = (offset + torch.arange(T, device=DEVICE)).expand(B, T) if positions is None else positions.expand(B, T)
    for interleaved in (False, True):
        op = cpp.rope_interleaved if interleaved else cpp.rope
        for inverse in (False, True):
            got = op(x, positions, offset if positions is None else 0, 10000.0, inverse)
            ref = rope64(x, pos, 10000.0, interleaved, inverse)
            signed = -pos if inverse else pos  # rotating by -angle is rotating to -position
            if interleaved:  # same-dtype baseline: the NeoX reference on de-interleaved dims, re-interleaved
                perm = torch.cat((torch.arange(0, D, 2), torch.arange(1, D, 2)))
                same = torch.empty_like(x)
                same[..., perm] = reference.rope(x[..., perm], x[..., perm], signed, theta=10000.0)[0]
            else:
                same = reference.rope(x, x, signed, theta=10000.0)[0]
            assert got.is_contiguous() and got.shape == x.shape
            assert_within_2x(f"rope interleaved={interleaved} inverse={inverse}", got, same, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_every_16_bit_value_round_trips(cpp, dtype):
    """The CPU loops' bit-level fp16/bf16 <-> fp32 conversions on all 65536 patterns (subnormals, signed zeros,
    infinities, NaN): RoPE at position 0 is the identity on finite values."""
    bits = torch.arange(-(2 ** 15), 2 ** 15, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype).reshape(1, 1, -1, 2).to(DEVICE)  # pairs (x1, x2): out = (x1 * 1 - x2 * 0, x2 + x1 * 0)
    out = cpp.rope(x, None, 0, 10000.0, False)
    finite = x.isfinite().all(-1, keepdim=True).expand_as(x)
    assert torch.equal(out[finite], x[finite])
    assert out[x.isnan()].isnan().all()


def test_batch_invariance_across_threads(cpp):
    """Each row is computed alone: splitting rows over threads (at::parallel_for chunks) changes no bit."""
    x = rows(301, 517, torch.bfloat16, "unaligned", 2.0, 1.0)
    y, _, rstd = cpp.layer_norm_fwd(x, None, 1e-5)
    for i in (0, 150, 300):
        y_i, _, rstd_i = cpp.layer_norm_fwd(x[i:i + 1], None, 1e-5)
        assert torch.equal(y_i[0], y[i]) and torch.equal(rstd_i[0], rstd[i])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(cpp.swiglu_fwd(x[:, :516]), cpp.swiglu_fwd(x[:, :516].contiguous()))
        y1 = cpp.layer_norm_fwd(x, None, 1e-5)[0]
    finally:
        torch.set_num_threads(before)
    assert torch.equal(y1, y)


def test_empty_batches(cpp):
    x = torch.empty(0, 16, device=DEVICE)
    y, h, rstd = cpp.layer_norm_fwd(x, x, 1e-5)
    assert y.shape == h.shape == (0, 16) and rstd.shape == (0,)
    assert cpp.swiglu_fwd(x).shape == (0, 8)
    assert cpp.rope(torch.empty(2, 0, 3, 8, device=DEVICE), None, 0, 1e4, False).shape == (2, 0, 3, 8)
    assert cpp.rope(torch.empty(2, 5, 3, 0, device=DEVICE), None, 0, 1e4, False).shape == (2, 5, 3, 0)
    assert cpp.silu_mul_fwd(torch.empty(4, 0, device=DEVICE), torch.empty(4, 0, device=DEVICE)).shape == (4, 0)


def test_bad_inputs_raise_clear_errors(cpp):
    x = torch.randn(4, 8, device=DEVICE)
    q = torch.randn(1, 3, 2, 8, device=DEVICE)
    bad = [
        (lambda: cpp.layer_norm_fwd(x.double(), None, 1e-5), "x must be float32, float16 or bfloat16, got Double"),
        (lambda: cpp.layer_norm_fwd(x[0], None, 1e-5), "x must be 2-D [N, C], got shape [8]"),
        (lambda: cpp.layer_norm_fwd(x, x[:, :4], 1e-5), "residual must have shape [4, 8], got [4, 4]"),
        (lambda: cpp.layer_norm_fwd(x, x.half(), 1e-5), "residual has dtype Half but x has Float"),
        (lambda: cpp.layer_norm_fwd(x[:, :0], None, 1e-5), "rows must not be empty"),
        (lambda: cpp.layer_norm_bwd(x, x, torch.ones(3, device=DEVICE), None), "rstd must be float32 [4]"),
        (lambda: cpp.norm_fwd(x, None, x[0, :7], None, 1e-5, False), "weight must have shape [8], got [7]"),
        (lambda: cpp.norm_bwd(x, x, x[0], None, x[:, 0], None, False, False), "the mean is needed exactly for"),
        (lambda: cpp.swiglu_fwd(x[:, :7]), "needs an even last dim"),
        (lambda: cpp.swiglu_bwd(x, x), "dout must have shape [4, 4], got [4, 8]"),
        (lambda: cpp.silu_mul_fwd(x.int(), x.int()), "gate must be float32, float16 or bfloat16, got Int"),
        (lambda: cpp.rope(x, None, 0, 1e4, False), "x must be [B, T, H, D], got shape [4, 8]"),
        (lambda: cpp.rope(q[..., :7], None, 0, 1e4, False), "the head dim must be even"),
        (lambda: cpp.rope(q, torch.arange(3, device=DEVICE).int(), 0, 1e4, False), "positions must be int64, got Int"),
        (lambda: cpp.rope(q, torch.arange(4, device=DEVICE), 0, 1e4, False), "positions must be [T] or [B, T]"),
    ]
    for call, message in bad:
        with pytest.raises(RuntimeError) as err:
            call()
        assert message in str(err.value), f"{message!r} not in {str(err.value)[:300]!r}"
