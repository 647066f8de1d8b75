"""The training attention's backward on tensor cores (csrc/kernels/attention_bwd.cu) under the CPU emulation of
the GPU (warp 32 with mma.sync's fragment layouts, warp 64 with MFMA's, fp32 inputs on the SIMT path), through its
C ABI launcher (kernels.h: olmo_fast_attention_bwd_gpu with its float workspace).

dq, dk, dv are checked against float64 PyTorch autograd of `ops.reference.attention` (clamp + SDPA) by the suite's
rule (`conftest.assert_within_2x`: at most 2x the error of the same op run by PyTorch in the inputs' dtype). The
kernel's `out` and `lse` come from float64 (out rounded to the dtype, lse in fp32, +inf for a row without keys),
not from a GPU forward. Outputs start as NaN. The cases cover GQA and MHA, causal or not, q_len != kv_len both
ways (queries that see no key), a clip with inputs beyond it (their gradient exactly 0) and exactly at it (the
gradient passes), a sliding window, head dims 64, 40, 80, 128 and 160 (padded to 64, 96, 128 and 192: the tilings
of both element sizes, fp32's streamed one included), odd lengths, several key and query blocks, strided inputs
(q, k, v slices of one packed qkv) and a batch of one.
"""
from __future__ import annotations

import ctypes

import pytest
import torch
from conftest import assert_within_2x
from emulated_gpu import DTYPE_CODES, DTYPES, f32, i32, i64, nan, p, ptr, struct
from emulated_gpu import launch as _launch

from olmo_fast.ops import reference

# olmo_fast_attention_bwd_args of kernels.h, field for field.
AttentionBwd = struct("AttentionBwd", [
    ("dtype", i32), ("batch", i64), ("q_len", i64), ("kv_len", i64), ("heads", i64), ("kv_heads", i64),
    ("head_dim", i64), ("dout", ptr), ("dout_strides", i64 * 3), ("q", ptr), ("q_strides", i64 * 3), ("k", ptr),
    ("k_strides", i64 * 3), ("v", ptr), ("v_strides", i64 * 3), ("out", ptr), ("out_strides", i64 * 3),
    ("lse", ptr), ("dq", ptr), ("dk", ptr), ("dv", ptr), ("scale", f32), ("clip", f32), ("has_clip", i32),
    ("causal", i32), ("window", i64), ("workspace", ptr)])

CLIP = 0.75  # exactly representable in every dtype; N(0, 1) inputs: ~45% beyond it

# (B, Tq, Tk, H, Hkv, D, causal, clip, window)
CASES = [
    (2, 37, 37, 4, 2, 64, True, CLIP, None),     # GQA, causal, clip, odd length, packed qkv
    (1, 37, 37, 4, 4, 40, False, None, None),    # MHA, full, D padded to 64
    (1, 40, 17, 4, 2, 64, True, CLIP, None),     # more queries than keys: rows without keys
    (2, 17, 45, 2, 2, 80, True, None, None),     # fewer queries than keys, D padded to 96
    (1, 100, 100, 2, 1, 64, True, CLIP, 24),     # sliding window over several key and query blocks
    (1, 21, 21, 2, 1, 160, True, CLIP, None),    # D padded to 192 (fp32: streamed tiles)
    (1, 33, 48, 4, 1, 128, True, CLIP, None),    # OLMo's head dim, a group of 4 query heads per kv head
    (2, 1, 5, 2, 1, 64, True, None, None),       # a single query per sequence
]


def _at_edges(t, clip):
    """t with ~10% of its entries exactly +-clip (where the clamp's gradient still passes)."""
    if clip is None:
        return t
    return torch.where(torch.rand(t.shape) < 0.1, torch.sign(torch.randn(t.shape)) * clip, t)


def _inputs(B, Tq, Tk, H, Hkv, D, dtype, clip):
    """q, k, v as strided views: slices of one packed qkv [B, T, (H + 2 Hkv) D] when Tq == Tk, else q a slice of
    a wider buffer and k, v head-major; N(0, 1) with some entries at +-clip."""
    if Tq == Tk:
        qkv = _at_edges(torch.randn(B, Tq, (H + 2 * Hkv) * D), clip).to(dtype)
        q = qkv[..., :H * D].view(B, Tq, H, D)
        k = qkv[..., H * D:(H + Hkv) * D].view(B, Tk, Hkv, D)
        v = qkv[..., (H + Hkv) * D:].view(B, Tk, Hkv, D)
        return q, k, v
    q = _at_edges(torch.randn(B, Tq, H + 1, D), clip)[:, :, 1:].to(dtype)
    k = _at_edges(torch.randn(B, Hkv, Tk, D), clip).transpose(1, 2).to(dtype)
    v = _at_edges(torch.randn(B, Hkv, Tk, D), clip).transpose(1, 2).to(dtype)
    return q, k, v


def reference_lse(q, k, causal, clip, scale, window):
    """float64 natural log-sum-exp of the scaled, clamped scores [B, H, Tq]; +inf for a row without keys."""
    q, k = (reference.clip_qkv(t.double(), clip) for t in (q, k))
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    scores = scale * torch.einsum("bihd,bjhd->bhij", q, k)
    Tq, Tk = q.shape[1], k.shape[1]
    visible = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)
    if causal:
        visible = visible.tril(diagonal=Tk - Tq)
    if window is not None:
        visible = visible.triu(diagonal=Tk - Tq - window + 1)
    lse = scores.masked_fill(~visible, float("-inf")).logsumexp(-1)
    return lse.masked_fill(lse == float("-inf"), float("inf"))


def reference_grads(q, k, v, dout, causal, clip, scale, window):
    """out and dq, dk, dv of ops.reference.attention (clamp + SDPA) in q's dtype, by autograd."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = reference.attention(q, k, v, causal, clip, scale, window)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout.to(out.dtype)))


def _workspace_floats(gpu, args: ctypes.Structure) -> int:
    fn = gpu.olmo_fast_attention_bwd_workspace_floats
    fn.argtypes, fn.restype = [ctypes.c_void_p], ctypes.c_int64
    return fn(ctypes.addressof(args))


def _strides(t):
    return (i64 * 3)(*t.stride()[:3])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-Tq{}-Tk{}-H{}-Hkv{}-D{}-{}-clip{}-win{}".format(
    *c[:6], "causal" if c[6] else "full", *c[7:]))
def test_attention_bwd_against_float64(gpu, dtype, case):
    B, Tq, Tk, H, Hkv, D, causal, clip, window = case
    scale = D ** -0.5
    q, k, v = _inputs(B, Tq, Tk, H, Hkv, D, dtype, clip)
    dout = torch.randn(B, Tq, H, D).to(dtype)
    ref = reference_grads(q.double(), k.double(), v.double(), dout.double(), causal, clip, scale, window)
    same = reference_grads(q, k, v, dout, causal, clip, scale, window)
    out = ref[0].to(dtype)
    lse = reference_lse(q, k, causal, clip, scale, window).float().contiguous()
    dq, dk, dv = nan(B, Tq, H, D, dtype=dtype), nan(B, Tk, Hkv, D, dtype=dtype), nan(B, Tk, Hkv, D, dtype=dtype)
    args = AttentionBwd(DTYPE_CODES[dtype], B, Tq, Tk, H, Hkv, D, p(dout), _strides(dout), p(q), _strides(q), p(k),
                        _strides(k), p(v), _strides(v), p(out), _strides(out), p(lse), p(dq), p(dk), p(dv), scale,
                        clip or 0.0, int(clip is not None), int(causal), window or 0, None)
    workspace = nan(_workspace_floats(gpu, args), dtype=torch.float32)
    args.workspace = p(workspace)
    _launch(gpu, "attention_bwd", args)
    for name, got, s, r in zip(("dq", "dk", "dv"), (dq, dk, dv), same[1:], ref[1:]):
        assert_within_2x(name, got, s, r)
    if clip is not None:  # the clamp's gradient is exactly zero beyond the clip
        for name, x, grad in zip(("dq", "dk", "dv"), (q, k, v), (dq, dk, dv)):
            beyond = x.abs() > clip
            assert beyond.any() and (grad[beyond] == 0).all(), name

