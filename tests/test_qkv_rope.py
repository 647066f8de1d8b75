"""Fused attention prologue (clamp -> split Q|K|V -> RoPE) forward + backward vs float64 PyTorch
(`ops.reference.qkv_rope` in float64) within flash-attention's rule (`conftest.assert_within_2x`), never NaN,
NaN-poisoned outputs; values exactly at +-clip (the gradient passes, as torch.clamp's) and beyond (it is zero),
GQA/MQA, one head, T=1, non-contiguous qkv (a slice of a wider buffer) and strided (dq, dk, dv).
"""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, assert_within_2x, poisoned_allocations, require_kernel_where_registered

from olmo_fast import ops

BACKENDS = ["triton", "cpp"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CLIP = 0.75  # exactly representable in every dtype
# (B, T, Hq, Hkv, D, clip, positions)
CASES = [
    (1, 1, 1, 1, 2, CLIP, "none"),
    (2, 5, 4, 2, 6, CLIP, "offset_per_seq"),
    (1, 4, 3, 1, 34, None, "offset"),
    (2, 3, 2, 2, 64, CLIP, "positions_BT"),
    (1, 6, 4, 4, 10, None, "positions_T"),
]


def make_qkv(B, T, Hq, Hkv, D, dtype, clip):
    """A strided view of a wider buffer, N(0, 1), ~10% of entries exactly at +-clip."""
    width = (Hq + 2 * Hkv) * D
    qkv = torch.randn(B, T, width + 4, device=DEVICE)[..., 3:width + 3]
    if clip is not None:
        edge = torch.rand(qkv.shape, device=DEVICE) < 0.1
        qkv = torch.where(edge, torch.sign(torch.randn_like(qkv)) * clip, qkv)
        qkv[..., 0], qkv[..., -1] = clip, -clip  # in q and in v, whatever the draw
    return qkv.to(dtype)


def position_kwargs(kind, B, T):
    return {"none": {}, "offset": {"offset": 513},
            "offset_per_seq": {"offset": torch.tensor([7, 1900][:B], device=DEVICE)},
            "positions_T": {"positions": torch.randperm(2048, device=DEVICE)[:T]},
            "positions_BT": {"positions": torch.randint(0, 4096, (B, T), device=DEVICE)}}[kind]


def run(qkv, grads, backend, **kwargs):
    qkv = qkv.detach().requires_grad_()
    outs = ops.qkv_rope(qkv, backend=backend, **kwargs)
    return [*outs, *torch.autograd.grad(outs, qkv, grads)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_against_float64(backend, dtype, case):
    require_kernel_where_registered("qkv_rope_fwd", backend)
    B, T, Hq, Hkv, D, clip, kind = case
    qkv = make_qkv(B, T, Hq, Hkv, D, dtype, clip)
    grads = (torch.randn(B, Hq, T, D, device=DEVICE).transpose(1, 2).to(dtype),  # head-major, as attention's
             torch.randn(B, T, Hkv, D + 1, device=DEVICE)[..., 1:].to(dtype),
             torch.randn(B, T, Hkv, D, device=DEVICE).to(dtype))
    kwargs = dict(n_heads=Hq, n_kv_heads=Hkv, clip=clip, **position_kwargs(kind, B, T))
    with poisoned_allocations():
        got = run(qkv, grads, backend, **kwargs)
    same = run(qkv, grads, "torch", **kwargs)
    ref = run(qkv.double(), tuple(g.double() for g in grads), "torch", **kwargs)
    for name, g, s, r in zip(("q", "k", "v", "dqkv"), got, same, ref):
        assert_within_2x(name, g, s, r)
    if clip is not None:  # the clamp's gradient: exactly zero beyond the clip, passing at and within it
        dqkv = got[3]
        assert (dqkv[qkv.abs() > clip] == 0).all()
        v_part = (slice(None), slice(None), slice((Hq + Hkv) * D, None))
        at_edge = qkv[v_part].abs() == clip
        assert at_edge.any() and (dqkv[v_part][at_edge] == grads[2].reshape(B, T, -1)[at_edge]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_separate_ops(backend):
    """The fused prologue equals clamp + split + ops.rope of the same backend (bitwise in fp32)."""
    require_kernel_where_registered("qkv_rope_fwd", backend)
    require_kernel_where_registered("rope", backend)
    B, T, Hq, Hkv, D = 2, 3, 4, 2, 16
    qkv = 2 * torch.randn(B, T, (Hq + 2 * Hkv) * D, device=DEVICE)
    q, k, v = ops.qkv_rope(qkv, n_heads=Hq, n_kv_heads=Hkv, clip=1.0, offset=5, backend=backend)
    cq, ck, cv = qkv.clamp(-1.0, 1.0).split((Hq * D, Hkv * D, Hkv * D), dim=-1)
    rq, rk = ops.rope(cq.view(B, T, Hq, D), ck.view(B, T, Hkv, D), offset=5, backend=backend)
    assert torch.equal(q, rq) and torch.equal(k, rk) and torch.equal(v, cv.view(B, T, Hkv, D))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_clip_keeps_no_input(backend):
    """Without a clip the backward needs nothing of qkv: the projection output is not kept alive."""
    require_kernel_where_registered("qkv_rope_fwd", backend)
    qkv = torch.randn(1, 2, 3 * 8, device=DEVICE, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ops.qkv_rope(qkv, n_heads=1, n_kv_heads=1, backend=backend)
    assert all(t.data_ptr() != qkv.data_ptr() for t in saved)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs(backend):
    require_kernel_where_registered("qkv_rope_fwd", backend)
    with pytest.raises(ValueError, match="even head dim"):
        ops.qkv_rope(torch.randn(1, 2, 9, device=DEVICE), n_heads=1, n_kv_heads=1, backend=backend)
    with pytest.raises(ValueError, match="positions"):
        ops.qkv_rope(torch.randn(1, 2, 12, device=DEVICE), n_heads=1, n_kv_heads=1,
                     positions=torch.arange(3, device=DEVICE), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clamp_is_torch_clamp(backend, dtype):
    """Exactly torch.clamp at the edges: clip 0.3 is not representable, and torch compares against it rounded to
    the dtype (0.30078125 in bf16, 0.30005 in fp16: above 0.3), so an input equal to the rounded bound keeps its
    value and passes its gradient, and the next value up is clamped with no gradient; NaN stays NaN (on a GPU
    tl.maximum/minimum would turn it into +-clip unless told to propagate it) and gets no gradient."""
    require_kernel_where_registered("qkv_rope_fwd", backend)
    clip, D = 0.3, 8
    bound = torch.tensor(clip, dtype=dtype)
    above = torch.nextafter(bound, torch.tensor(1.0, dtype=dtype))
    head = torch.randn(D).to(dtype).clamp(-0.25, 0.25)
    head[:4] = torch.stack([bound, -bound, torch.tensor(float("nan"), dtype=dtype), -above])
    qkv = head.repeat(3).view(1, 1, 3 * D).to(DEVICE)  # the same head as q, k and v
    grads = tuple(torch.randn(1, 1, 1, D, device=DEVICE).to(dtype) for _ in range(3))
    kwargs = dict(n_heads=1, n_kv_heads=1, clip=clip)
    with poisoned_allocations():
        got = run(qkv, grads, backend, **kwargs)
    want = run(qkv, grads, "torch", **kwargs)
    assert torch.equal(got[2].isnan(), want[2].isnan()) and got[2].isnan().sum() == 1
    v_got, v_want = got[2].nan_to_num(7.0), want[2].nan_to_num(7.0)
    assert torch.equal(v_got, v_want)  # v: clamped only, no rotation: bitwise
    assert v_got.flatten()[0] == bound and v_got.flatten()[3] == -bound
    dv_got = got[3][..., 2 * D:].flatten()
    assert torch.equal(dv_got, want[3][..., 2 * D:].flatten())
    assert dv_got[0] == grads[2].flatten()[0] and dv_got[1] == grads[2].flatten()[1]  # passes at +-bound
    assert dv_got[2] == 0 and dv_got[3] == 0  # NaN and beyond the bound: no gradient
    for g, w in zip(got[:2], want[:2]):  # q, k: a NaN rotates into its pair; the rest as torch's, to rounding
        assert torch.equal(g.isnan(), w.isnan()) and g.isnan().sum() == 2
        torch.testing.assert_close(g, w, equal_nan=True)
    torch.testing.assert_close(got[3], want[3])
    assert torch.equal(got[3] == 0, want[3] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clip_qkv_bound_is_the_kernels(dtype):
    """`ops.clip_qkv`, the clamp of the "torch" backend and of the patched models, clamps at the bound the Triton
    kernels are given (`kernels._clamp.clip_bound`: the clip rounded to the dtype), keeps NaN, and passes the
    gradient at the bound; `test_clamp_is_torch_clamp` checks the kernels' clamp against it on the device."""
    pytest.importorskip("triton")
    from olmo_fast.kernels._clamp import clip_bound

    for clip in (0.3, 1.7, 5.0):
        bound = clip_bound(clip, dtype)
        t = torch.tensor([100.0, -100.0, float("nan"), bound, -bound], dtype=dtype, requires_grad=True)
        got = ops.clip_qkv(t, clip)
        assert got[0].item() == bound == -got[1].item() and got[2].isnan()
        got.sum().backward()
        assert t.grad.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    t = torch.randn(3)
    assert ops.clip_qkv(t, None) is t
