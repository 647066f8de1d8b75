"""The training attention forward on tensor cores (csrc/kernels/attention_fwd.cu) under the CPU emulation
(csrc/emulation/emulated_gpu.h): warp 32 runs NVIDIA's mma.sync fragment layouts, warp 64 AMD's MFMA ones, fp32
the SIMT path. Called through its C ABI launcher with ctypes; out and lse checked against float64 PyTorch by the
suite's rule (`conftest.assert_within_2x`: at most 2x plain PyTorch's error in the same dtype; lse is fp32 whatever
the inputs, so its "same" is PyTorch's fp32 on the inputs' values), outputs NaN-poisoned so an unwritten element
fails.

Cases: causal and not, GQA (a kv head shared, never repeated) and MHA, bottom-right causal masks with q_len < kv_len
and q_len > kv_len (rows that see no key: out 0, lse +inf), no key at all, clip with inputs beyond it, a sliding
window across query blocks and a window of one key, head dims 64 and others (24, 36, 40, 80, 128, 200: each
tile-size instance of the kernel, zero-padded dims), lengths that are no multiple of the blocks, several query and
key blocks, strided q/k/v (slices of a packed qkv, heads-major tensors, rows off 16-byte boundaries), a batch of
one, a single query; and the launcher's refusals. The whole file takes under a minute on 2 busy cores, most of it
compiling the emulated kernels.
"""
from __future__ import annotations

import ctypes

import pytest
import torch
from conftest import assert_within_2x
from emulated_gpu import DTYPE_CODES, DTYPES, f32, i32, i64, launch, nan, p, ptr, struct

from olmo_fast.ops import reference

# olmo_fast_attention_fwd_args of kernels.h, field for field.
AttentionFwd = struct("AttentionFwd", [("dtype", i32), ("batch", i64), ("q_len", i64), ("kv_len", i64),
                                       ("heads", i64), ("kv_heads", i64), ("head_dim", i64), ("q", ptr),
                                       ("q_strides", i64 * 3), ("k", ptr), ("k_strides", i64 * 3), ("v", ptr),
                                       ("v_strides", i64 * 3), ("out", ptr), ("lse", ptr), ("scale", f32),
                                       ("clip", f32), ("has_clip", i32), ("causal", i32), ("window", i64)])


def attention_inputs(B, Tq, Tk, H, Hkv, D, dtype, layout, spread, device="cpu"):
    """q [B, Tq, H, D], k, v [B, Tk, Hkv, D], N(0, spread^2), in one of the layouts the model hands over."""
    if layout == "packed":  # slices of one fused projection [B, T, (H + 2 Hkv), D], as the model's qkv
        assert Tq == Tk
        qkv = spread * torch.randn(B, Tq, H + 2 * Hkv, D, device=device)
        return [t.to(dtype) for t in (qkv[:, :, :H], qkv[:, :, H:H + Hkv], qkv[:, :, H + Hkv:])]
    if layout == "heads-major":  # [B, H, T, D] transposed: token rows D apart, heads T * D apart
        shapes = ((B, H, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D))
        return [(spread * torch.randn(s, device=device)).transpose(1, 2).to(dtype) for s in shapes]
    if layout == "unaligned":  # token rows H * D + 1 apart, the data one element past a 16-byte boundary
        sizes = ((B, Tq, H), (B, Tk, Hkv), (B, Tk, Hkv))
        return [(spread * torch.randn(b, t, h * D + 1, device=device)).to(dtype)[..., 1:].view(b, t, h, D)
                for b, t, h in sizes]
    shapes = ((B, Tq, H, D), (B, Tk, Hkv, D), (B, Tk, Hkv, D))
    return [(spread * torch.randn(s, device=device)).to(dtype) for s in shapes]


def _visible(Tq, Tk, causal, window, device):
    """[Tq, Tk]: which keys each query sees (bottom-right causal, the window's last keys), written out."""
    i = torch.arange(Tq, device=device)[:, None] + Tk - Tq
    j = torch.arange(Tk, device=device)[None, :]
    seen = (j <= i) if causal else torch.ones(Tq, Tk, dtype=torch.bool, device=device)
    return seen & (j > i - window) if window else seen


def _lse(q, k, causal, clip, window):
    """[B, H, Tq]: the natural log-sum-exp of the scaled scores in q's dtype, -inf for a query without keys."""
    q, k = reference.clip_qkv(q, clip), reference.clip_qkv(k, clip)
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    hidden = ~_visible(q.shape[1], k.shape[1], causal, window, q.device)
    return scores.masked_fill(hidden, float("-inf")).logsumexp(-1)


def check_attention_fwd(out, lse, q, k, v, causal, clip, window):
    """The kernel's out and lse of attention(q, k, v) (scale D^-1/2) against float64 by the suite's rule; a query
    that sees no key: out 0 and lse +inf."""
    B, Tq, H, _ = q.shape

    def attention(*t):
        return reference.attention(*t, causal=causal, clip_value=clip, window=window)

    assert_within_2x("out", out, attention(q, k, v), attention(q.double(), k.double(), v.double()))
    ref_lse = _lse(q.double(), k.double(), causal, clip, window)
    seen = ref_lse.isfinite()
    assert_within_2x("lse", lse[seen], _lse(q.float(), k.float(), causal, clip, window)[seen], ref_lse[seen])
    empty = ~_visible(Tq, k.shape[1], causal, window, q.device).any(-1)  # queries that see no key
    assert (lse[:, :, empty] == float("inf")).all() and (out[:, empty] == 0).all()
    assert seen.sum() == B * H * (Tq - empty.sum())


def _run(gpu, q, k, v, causal, clip, window):
    """out, lse of the emulated kernel (scale D^-1/2), both NaN before it runs."""
    B, Tq, H, D = q.shape
    out, lse = nan(B, Tq, H, D, dtype=q.dtype), nan(B, H, Tq, dtype=torch.float32)
    bound = 0.0 if clip is None else float(torch.tensor(clip, dtype=q.dtype))  # the clip rounded to the dtype
    launch(gpu, "attention_fwd", AttentionFwd(
        DTYPE_CODES[q.dtype], B, Tq, k.shape[1], H, k.shape[2], D, p(q), (i64 * 3)(*q.stride()[:3]), p(k),
        (i64 * 3)(*k.stride()[:3]), p(v), (i64 * 3)(*v.stride()[:3]), p(out), p(lse), D ** -0.5, bound,
        int(clip is not None), int(causal), window or 0))
    return out, lse


# (B, Tq, Tk, H, Hkv, D, causal, clip, window, layout)
CASES = {
    "gqa-causal-clip-packed-B1": (1, 37, 37, 4, 2, 64, True, 0.75, None, "packed"),
    "mha-full-D36-unaligned": (2, 37, 37, 2, 2, 36, False, None, None, "unaligned"),  # element-wise tile moves
    "q<kv-causal-D24-heads-major": (1, 20, 70, 4, 2, 24, True, None, None, "heads-major"),
    "q>kv-causal-clip-empty-rows": (2, 45, 19, 2, 1, 64, True, 0.75, None, "contiguous"),
    # window 40: in the second query block a key block lies below the diagonal, but only some rows' windows
    # reach back to its first key (masked all the same)
    "window-D80-across-query-blocks": (1, 83, 83, 2, 1, 80, True, None, 40, "packed"),
    "D200-gqa-clip": (1, 19, 23, 2, 1, 200, True, 0.75, None, "heads-major"),
    "single-query": (1, 1, 33, 4, 1, 64, True, None, None, "contiguous"),
    "window-1-D40": (1, 100, 100, 2, 1, 40, True, None, 1, "contiguous"),  # each query sees itself only
    "many-blocks-D128-q<kv": (1, 150, 230, 2, 1, 128, True, 0.75, None, "heads-major"),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_attention_fwd_against_float64(gpu, dtype, case):
    B, Tq, Tk, H, Hkv, D, causal, clip, window, layout = case
    q, k, v = attention_inputs(B, Tq, Tk, H, Hkv, D, dtype, layout, spread=2.0 if clip else 1.0)
    if clip is not None:
        assert (q.abs() > clip).any() and (k.abs() > clip).any() and (v.abs() > clip).any()
    check_attention_fwd(*_run(gpu, q, k, v, causal, clip, window), q, k, v, causal, clip, window)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_fwd_without_keys(gpu, causal):
    """kv_len = 0: no key block to visit, every row is a row without keys (out 0, lse +inf)."""
    q, k, v = attention_inputs(2, 5, 0, 2, 1, 24, torch.bfloat16, "contiguous", spread=1.0)
    out, lse = _run(gpu, q, k, v, causal, None, None)
    assert (out == 0).all() and (lse == float("inf")).all()


@pytest.mark.parametrize("bad", ["head_dim", "heads", "window"])
def test_attention_fwd_rejects_bad_args(gpu, bad):
    """The launcher refuses what the kernel cannot run (the binding checks first) instead of launching it: head_dim
    past 256, query heads no multiple of the kv heads, a window without the causal mask."""
    D, H, causal, window = (257, 2, 1, 0) if bad == "head_dim" else (8, 3, 1, 0) if bad == "heads" else (8, 2, 0, 4)
    q, k = torch.zeros(1, 3, H, D), torch.zeros(1, 3, 2, D)
    out, lse = nan(1, 3, H, D, dtype=torch.float32), nan(1, H, 3, dtype=torch.float32)
    args = AttentionFwd(DTYPE_CODES[torch.float32], 1, 3, 3, H, 2, D, p(q), (i64 * 3)(*q.stride()[:3]), p(k),
                        (i64 * 3)(*k.stride()[:3]), p(k), (i64 * 3)(*k.stride()[:3]), p(out), p(lse), 1.0, 0.0, 0,
                        causal, window)
    fn = gpu.olmo_fast_attention_fwd_gpu
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int
    assert fn(ctypes.addressof(args), None) != 0
    assert out.isnan().all() and lse.isnan().all()  # nothing ran
