"""The CUDA/HIP kernels of csrc/kernels/*.cu run on the CPU under the emulation of csrc/emulation/emulated_gpu.h
(a block's threads as host threads, barriers, shared memory, warp shuffles for a warp of 32 and one of 64),
called through their C ABI launchers (csrc/include/olmo_fast/kernels.h) with ctypes, and checked against float64
PyTorch by the suite's rule (`conftest.assert_within_2x`: at most 2x plain PyTorch's error in the same dtype).
Outputs start as NaN, so an element a kernel never writes fails. Odd sizes: partial warps of data, strided rows,
rows that leave vector loads for scalar ones.

The emulated library is compiled once per warp size by the host C++ compiler (about a minute on 2 busy cores);
the tests of this file skip where there is none.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_within_2x
from emulated_gpu import DTYPE_CODES, DTYPES, f32, i32, i64, ptr
from emulated_gpu import launch as _launch
from emulated_gpu import nan as _nan
from emulated_gpu import p as _p
from emulated_gpu import struct as _struct

from olmo_fast.ops import reference
from olmo_fast.rope_scaling import RopeScaling, rope_frequencies

# The argument structs of kernels.h, field for field.
NormFwd = _struct("NormFwd", [("dtype", i32), ("rows", i64), ("cols", i64), ("x", ptr), ("x_stride", i64),
                              ("residual", ptr), ("residual_stride", i64), ("weight", ptr), ("bias", ptr), ("y", ptr),
                              ("h", ptr), ("mean", ptr), ("rstd", ptr), ("eps", f32), ("rms", i32),
                              ("add_after", i32)])
NormBwd = _struct("NormBwd", [("dtype", i32), ("rows", i64), ("cols", i64), ("dy", ptr), ("dy_stride", i64),
                              ("saved", ptr), ("saved_stride", i64), ("weight", ptr), ("mean", ptr), ("rstd", ptr),
                              ("dh", ptr), ("dh_stride", i64), ("dx", ptr), ("dweight", ptr), ("dbias", ptr),
                              ("partials", i64), ("from_input", i32), ("rms", i32)])
SiluMulFwd = _struct("SiluMulFwd", [("dtype", i32), ("rows", i64), ("hidden", i64), ("gate", ptr),
                                    ("gate_stride", i64), ("up", ptr), ("up_stride", i64), ("out", ptr),
                                    ("out_stride", i64)])
SiluMulBwd = _struct("SiluMulBwd", [("dtype", i32), ("rows", i64), ("hidden", i64), ("dout", ptr),
                                    ("dout_stride", i64), ("gate", ptr), ("gate_stride", i64), ("up", ptr),
                                    ("up_stride", i64), ("d_gate", ptr), ("d_gate_stride", i64), ("d_up", ptr),
                                    ("d_up_stride", i64)])
Rope = _struct("Rope", [("dtype", i32), ("batch", i64), ("seq", i64), ("heads", i64), ("head_dim", i64), ("x", ptr),
                        ("x_strides", i64 * 4), ("out", ptr), ("positions", ptr), ("positions_batch_stride", i64),
                        ("offset", i64), ("theta", f32), ("inverse", i32), ("interleaved", i32)])
QkvRopeFwd = _struct("QkvRopeFwd", [("dtype", i32), ("batch", i64), ("seq", i64), ("q_heads", i64),
                                    ("kv_heads", i64), ("head_dim", i64), ("qkv", ptr), ("qkv_strides", i64 * 2),
                                    ("q", ptr), ("k", ptr), ("v", ptr), ("positions", ptr),
                                    ("positions_batch_stride", i64), ("offset", i64), ("theta", f32), ("clip", f32),
                                    ("has_clip", i32)])
QkvRopeBwd = _struct("QkvRopeBwd", [("dtype", i32), ("batch", i64), ("seq", i64), ("q_heads", i64),
                                    ("kv_heads", i64), ("head_dim", i64), ("grads", ptr * 3),
                                    ("grad_strides", (i64 * 4) * 3), ("qkv", ptr), ("qkv_strides", i64 * 2),
                                    ("dqkv", ptr), ("positions", ptr), ("positions_batch_stride", i64),
                                    ("offset", i64), ("theta", f32), ("clip", f32), ("has_clip", i32)])
QkNormRopeFwd = _struct("QkNormRopeFwd", [("dtype", i32), ("batch", i64), ("seq", i64), ("q_heads", i64),
                                          ("kv_heads", i64), ("head_dim", i64), ("qkv", ptr), ("qkv_strides", i64 * 2),
                                          ("q_weight", ptr), ("k_weight", ptr), ("q", ptr), ("k", ptr), ("v", ptr),
                                          ("rstd", ptr), ("positions", ptr), ("positions_batch_stride", i64),
                                          ("offset", i64), ("inv_freq", ptr), ("attention_factor", f32),
                                          ("eps", f32)])
QkNormRopeBwd = _struct("QkNormRopeBwd", [("dtype", i32), ("batch", i64), ("seq", i64), ("q_heads", i64),
                                          ("kv_heads", i64), ("head_dim", i64), ("grads", ptr * 3),
                                          ("grad_strides", (i64 * 4) * 3), ("qkv", ptr), ("qkv_strides", i64 * 2),
                                          ("q_weight", ptr), ("k_weight", ptr), ("rstd", ptr), ("dqkv", ptr),
                                          ("dq_weight", ptr), ("dk_weight", ptr), ("partials", i64),
                                          ("positions", ptr), ("positions_batch_stride", i64), ("offset", i64),
                                          ("inv_freq", ptr), ("attention_factor", f32)])
CrossEntropy = _struct("CrossEntropy", [("dtype", i32), ("rows", i64), ("vocab", i64), ("logits", ptr),
                                        ("logits_stride", i64), ("labels", ptr), ("loss", ptr), ("lse", ptr),
                                        ("ignore_index", i64), ("compute_grad", i32), ("z_loss", f32)])


def _rows(n: int, c: int, dtype: torch.dtype, pad: int = 3) -> torch.Tensor:
    """[n, c] rows `c + pad` apart (strided: the kernels' scalar path when pad breaks 16-byte alignment)."""
    return torch.randn(n, c + pad)[:, :c].to(dtype)


def _outputs_and_grads(fn, inputs: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """fn's outputs on fresh leaves of `inputs`, then the inputs' gradients for the output gradients `grads` (each
    cast to its output's dtype): the references the kernels' forward and backward are checked against."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    return [*outs, *torch.autograd.grad(outs, leaves, [g.to(o.dtype) for g, o in zip(grads, outs)])]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cols,pad", [(300, 3), (256, 0)])
def test_layer_norm_fwd_bwd(gpu, dtype, cols, pad):
    n = 7
    x, dy = _rows(n, cols, dtype, pad), _rows(n, cols, dtype, pad)
    y, rstd, dx = _nan(n, cols, dtype=dtype), _nan(n, dtype=torch.float32), _nan(n, cols, dtype=dtype)
    _launch(gpu, "norm_fwd", NormFwd(DTYPE_CODES[dtype], n, cols, _p(x), x.stride(0), None, 0, None, None, _p(y),
                                     None, None, _p(rstd), 1e-5, 0, 0))
    _launch(gpu, "norm_bwd", NormBwd(DTYPE_CODES[dtype], n, cols, _p(dy), dy.stride(0), _p(y), cols, None, None,
                                     _p(rstd), None, 0, _p(dx), None, None, 0, 0, 0))

    ref_y, ref_dx = _outputs_and_grads(reference.layer_norm, [x.double()], [dy])
    same_y, same_dx = _outputs_and_grads(reference.layer_norm, [x], [dy])
    assert_within_2x("y", y, same_y, ref_y)
    assert_within_2x("dx", dx, same_dx, ref_dx)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cols,pad", [(300, 3), (256, 0)])
def test_rms_norm_add_after(gpu, dtype, cols, pad):
    """OLMo 2's post-norm: y = residual + RMSNorm(x) * weight, the norm rounded to the dtype before the add."""
    n = 5
    x, residual = _rows(n, cols, dtype, pad), _rows(n, cols, dtype, pad)
    weight = torch.rand(cols).add(0.5).to(dtype)
    y, rstd = _nan(n, cols, dtype=dtype), _nan(n, dtype=torch.float32)
    _launch(gpu, "norm_fwd", NormFwd(DTYPE_CODES[dtype], n, cols, _p(x), x.stride(0), _p(residual),
                                     residual.stride(0), _p(weight), None, _p(y), None, None, _p(rstd), 1e-6, 1, 1))
    ref = reference.rms_norm_add(x.double(), weight.double(), residual.double(), 1e-6)
    assert_within_2x("y", y, reference.rms_norm_add(x, weight, residual, 1e-6), ref)
    torch.testing.assert_close(rstd.double(), x.double().pow(2).mean(-1).add(1e-6).rsqrt(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 3, 1, 16, "offset"), (1, 2, 17, 1, 128, "positions")], ids=str)
def test_qk_norm_rope_fwd_bwd(gpu, dtype, shape):
    """OLMo 2's prologue (QK-RMSNorm over all heads, then RoPE with yarn's attention factor): forward, and the
    backward with its weight gradients in 3 accumulator rows; the second shape has more rotation pairs (1088)
    than a block has threads."""
    B, T, Hq, Hkv, D, where = shape
    width = (Hq + 2 * Hkv) * D
    qkv = (3 * torch.randn(B, T, width + 3))[..., :width].to(dtype)
    q_weight, k_weight = torch.rand(Hq * D) + 0.5, torch.rand(Hkv * D) + 0.5
    positions = torch.randint(0, 4096, (B, T)) if where == "positions" else None
    offset = 0 if where == "positions" else 7
    scaling = RopeScaling(rope_type="yarn", factor=4.0, original_max_position_embeddings=64)
    inv_freq, factor = rope_frequencies(D, 500000.0, scaling)
    grads = [torch.randn(B, T, h, D).to(dtype) for h in (Hq, Hkv, Hkv)]
    q, k, v = (_nan(B, T, h, D, dtype=dtype) for h in (Hq, Hkv, Hkv))
    rstd, dqkv = _nan(B * T, 2, dtype=torch.float32), _nan(B, T, width, dtype=dtype)
    dq_w, dk_w = torch.zeros(3, Hq * D), torch.zeros(3, Hkv * D)
    common = (DTYPE_CODES[dtype], B, T, Hq, Hkv, D)
    pos = (_p(positions), T if positions is not None else 0, offset, _p(inv_freq), factor)
    _launch(gpu, "qk_norm_rope_fwd", QkNormRopeFwd(*common, _p(qkv), (i64 * 2)(*qkv.stride()[:2]), _p(q_weight),
                                                   _p(k_weight), _p(q), _p(k), _p(v), _p(rstd), *pos, 1e-6))
    strides = ((i64 * 4) * 3)(*((i64 * 4)(*g.stride()) for g in grads))
    _launch(gpu, "qk_norm_rope_bwd", QkNormRopeBwd(*common, (ptr * 3)(*(_p(g) for g in grads)), strides, _p(qkv),
                                                   (i64 * 2)(*qkv.stride()[:2]), _p(q_weight), _p(k_weight),
                                                   _p(rstd), _p(dqkv), _p(dq_w), _p(dk_w), 3, *pos))

    def prologue(*inputs):
        return reference.qk_norm_rope(*inputs, Hq, Hkv, 1e-6, positions, offset, 500000.0, scaling)

    ref = _outputs_and_grads(prologue, [qkv.double(), q_weight.double(), k_weight.double()], grads)
    same = _outputs_and_grads(prologue, [qkv, q_weight.to(dtype), k_weight.to(dtype)], grads)
    got = [q, k, v, dqkv, dq_w.sum(0), dk_w.sum(0)]
    for name, g, s_, r in zip(("q", "k", "v", "dqkv", "dq_weight", "dk_weight"), got, same, ref):
        assert_within_2x(name, g, s_.to(g.dtype), r)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [40, 67])
def test_swiglu_fwd_bwd(gpu, dtype, hidden):
    n = 9
    h, dout = _rows(n, 2 * hidden, dtype), torch.randn(n, hidden).to(dtype)
    out, dh = _nan(n, hidden, dtype=dtype), _nan(n, 2 * hidden, dtype=dtype)
    size = h.element_size()
    # OLMo's fused [up | gate]: gate = h + hidden, up = h, both with h's row stride
    _launch(gpu, "silu_mul_fwd", SiluMulFwd(DTYPE_CODES[dtype], n, hidden, _p(h) + hidden * size, h.stride(0),
                                            _p(h), h.stride(0), _p(out), hidden))
    _launch(gpu, "silu_mul_bwd", SiluMulBwd(DTYPE_CODES[dtype], n, hidden, _p(dout), hidden,
                                            _p(h) + hidden * size, h.stride(0), _p(h), h.stride(0),
                                            _p(dh) + hidden * size, 2 * hidden, _p(dh), 2 * hidden))

    ref_o, ref_dh = _outputs_and_grads(reference.swiglu, [h.double()], [dout])
    same_o, same_dh = _outputs_and_grads(reference.swiglu, [h], [dout])
    assert_within_2x("out", out, same_o, ref_o)
    assert_within_2x("dh", dh, same_dh, ref_dh)


def _rope_ref(x: torch.Tensor, offset: int, inverse: bool) -> torch.Tensor:
    """reference.rope of x alone (as q; a one-head k is discarded); the inverse turns by the negated angle."""
    positions = reference.rope_positions(x.shape[1], offset, x.device)
    return reference.rope(x, x[:, :, :1], positions=-positions if inverse else positions)[0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("head_dim", [16, 34])
def test_rope(gpu, dtype, inverse, head_dim):
    B, T, H = 2, 5, 3
    x = torch.randn(B, T, H + 1, head_dim)[:, :, 1:].to(dtype)  # strided heads
    out = _nan(B, T, H, head_dim, dtype=dtype)
    _launch(gpu, "rope", Rope(DTYPE_CODES[dtype], B, T, H, head_dim, _p(x), (i64 * 4)(*x.stride()), _p(out), None,
                              0, 7, 10000.0, int(inverse), 0))
    assert_within_2x("out", out, _rope_ref(x, 7, inverse), _rope_ref(x.double(), 7, inverse))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [(2, 3, 4, 2, 16, 0.75), (1, 4, 3, 1, 34, None)], ids=str)
def test_qkv_rope_fwd_bwd(gpu, dtype, case):
    B, T, Hq, Hkv, D, clip = case
    width = (Hq + 2 * Hkv) * D
    qkv = (2 * torch.randn(B, T, width + 2))[..., 1:width + 1].to(dtype)
    grads = (torch.randn(B, Hq, T, D).transpose(1, 2).to(dtype), torch.randn(B, T, Hkv, D).to(dtype),
             torch.randn(B, T, Hkv, D).to(dtype))
    q, k, v = _nan(B, T, Hq, D, dtype=dtype), _nan(B, T, Hkv, D, dtype=dtype), _nan(B, T, Hkv, D, dtype=dtype)
    dqkv = _nan(B, T, width, dtype=dtype)
    bound = 0.0 if clip is None else float(torch.tensor(clip, dtype=dtype))
    strides = (i64 * 2)(qkv.stride(0), qkv.stride(1))
    _launch(gpu, "qkv_rope_fwd", QkvRopeFwd(DTYPE_CODES[dtype], B, T, Hq, Hkv, D, _p(qkv), strides, _p(q), _p(k),
                                            _p(v), None, 0, 3, 10000.0, bound, int(clip is not None)))
    grad_strides = ((i64 * 4) * 3)(*[(i64 * 4)(*g.stride()) for g in grads])
    _launch(gpu, "qkv_rope_bwd", QkvRopeBwd(DTYPE_CODES[dtype], B, T, Hq, Hkv, D, (ptr * 3)(*map(_p, grads)),
                                            grad_strides, _p(qkv), strides, _p(dqkv), None, 0, 3, 10000.0, bound,
                                            int(clip is not None)))

    def prologue(t):
        return reference.qkv_rope(t, Hq, Hkv, clip, offset=3)

    same_outs = _outputs_and_grads(prologue, [qkv], grads)
    ref_outs = _outputs_and_grads(prologue, [qkv.double()], grads)
    for name, got, same, ref in zip(("q", "k", "v", "dqkv"), (q, k, v, dqkv), same_outs, ref_outs):
        assert_within_2x(name, got, same, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("vocab", "z_loss"), [(203, 0.0), (16411, 0.0), (203, 0.01)])  # 256 threads a row, 1024
def test_cross_entropy_chunk(gpu, dtype, vocab, z_loss):
    n = 3 if vocab > 16384 else 6
    logits = _rows(n, vocab, dtype, pad=5) * 4
    labels = torch.randint(0, vocab, (n,))
    labels[1] = -100
    scored = labels != -100

    def losses(z):  # per row: CE + z_loss * logsumexp^2 (OLMo-core's z-loss), 0 where ignored
        lse = torch.logsumexp(z, -1)
        return (F.cross_entropy(z, labels, reduction="none") + z_loss * lse.pow(2) * scored), lse * scored

    z64 = logits.double().requires_grad_()
    per_row, lse_ref = losses(z64)
    (grad_ref,) = torch.autograd.grad(per_row.sum(), z64)
    z32 = logits.float().requires_grad_()
    plain, plain_lse = losses(z32)
    (plain_grad,) = torch.autograd.grad(plain.sum(), z32)
    loss, lse = _nan(n, dtype=torch.float32), _nan(n, dtype=torch.float32)
    _launch(gpu, "cross_entropy_chunk", CrossEntropy(DTYPE_CODES[dtype], n, vocab, _p(logits), logits.stride(0),
                                                     _p(labels), _p(loss), _p(lse), -100, 1, z_loss))
    assert_within_2x("loss", loss, plain.detach(), per_row.detach())
    assert_within_2x("lse", lse, plain_lse.detach(), lse_ref.detach())
    assert_within_2x("grad", logits, plain_grad.to(dtype), grad_ref)
    assert loss[1] == 0 and lse[1] == 0 and (logits[1] == 0).all()
