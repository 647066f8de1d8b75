"""The "cpp" backend's CUDA/HIP kernels for the attention prologue (`qkv_rope` forward and backward), the
cross-entropy chunk, decode attention and the training attention's forward and backward (csrc/kernels/qkv_rope.cu,
cross_entropy.cu, decode_attention.cu, attention_fwd.cu, attention_bwd.cu), on a GPU: against float64 PyTorch by
the suite's rule (`conftest.assert_within_2x`: at most 2x plain PyTorch's error in the same dtype), with NaN-poisoned
outputs, on shapes that exercise the kernels' launch choices (many tokens per block through the grid-stride loop; a
vocabulary above and below the 16384 that switches 256 -> 1024 threads a row; decode attention's split counts, row
chunks and vector widths; attention's three head-dim instances and their tile sizes, many query and key blocks; the
backward's tilings).

The shared op tests (tests/test_qkv_rope.py, tests/test_linear_cross_entropy.py) also run the "cpp" backend on
the GPU when one is present. Everything here is GPU-marked and skipped without CUDA/ROCm.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_within_2x
from test_gpu_emulation_attention import attention_inputs, check_attention_fwd
from test_gpu_emulation_decode import decode_inputs

from olmo_fast import ops
from olmo_fast.ops import reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm GPU")]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _poisoned():
    """The extension's outputs start as NaN (its poison_outputs hook), so an element a kernel never writes fails."""
    _cpp_kernel("qkv_rope_fwd")  # loads the extension (and fails the test where it has no GPU kernels)
    ops_c = torch.ops.olmo_fast_C
    ops_c.poison_outputs(True)
    yield
    ops_c.poison_outputs(False)


def _cpp_kernel(name: str):
    """The "cpp" kernel `name` for the GPU (BackendError, failing the test, when the extension has none)."""
    from olmo_fast.ops import dispatch

    return dispatch.kernel(name, "cpp", "cuda")


def _qkv_rope_run(qkv, grads, backend, **kwargs):
    qkv = qkv.detach().requires_grad_()
    outs = ops.qkv_rope(qkv, backend=backend, **kwargs)
    return [*outs, *torch.autograd.grad(outs, qkv, grads)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [(3, 301, 8, 2, 64, 0.75), (2, 7, 5, 5, 130, None), (1, 4, 32, 8, 128, 2.0)],
                         ids=str)
def test_qkv_rope_gpu_against_float64(case, dtype):
    _cpp_kernel("qkv_rope_fwd")
    B, T, Hq, Hkv, D, clip = case
    width = (Hq + 2 * Hkv) * D
    qkv = (2 * torch.randn(B, T, width + 2, device="cuda"))[..., 1:width + 1].to(dtype)  # strided token rows
    grads = (torch.randn(B, Hq, T, D, device="cuda").transpose(1, 2).to(dtype),  # strided, as attention's dq
             torch.randn(B, T, Hkv, D, device="cuda").to(dtype), torch.randn(B, T, Hkv, D, device="cuda").to(dtype))
    kwargs = dict(n_heads=Hq, n_kv_heads=Hkv, clip=clip, offset=11)
    got = _qkv_rope_run(qkv, grads, "cpp", **kwargs)
    same = _qkv_rope_run(qkv, grads, "torch", **kwargs)
    ref = _qkv_rope_run(qkv.double(), tuple(g.double() for g in grads), "torch", **kwargs)
    for name, g, s, r in zip(("q", "k", "v", "dqkv"), got, same, ref):
        assert_within_2x(name, g, s, r)
    if clip is not None:
        assert (got[3][qkv.abs() > clip] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [1031, 50304])
def test_cross_entropy_chunk_gpu_against_float64(vocab, dtype):
    kernel = _cpp_kernel("cross_entropy_chunk")
    n = 37
    buffer = torch.full((n, vocab + 9), 1234.0, device="cuda", dtype=dtype)
    logits = buffer[:, 3:3 + vocab]  # rows strided: the neighbouring columns must stay untouched
    logits.copy_(torch.randn(n, vocab, device="cuda") * 4)
    y = torch.randint(0, vocab, (n,), device="cuda")
    y[::7] = -100
    z64 = logits.double().requires_grad_()
    per_row = F.cross_entropy(z64, y, reduction="none")
    (grad_ref,) = torch.autograd.grad(per_row.sum(), (z64,))
    z32 = logits.float().requires_grad_()
    plain = F.cross_entropy(z32, y, reduction="none")
    (plain_grad,) = torch.autograd.grad(plain.sum(), (z32,))
    losses, lse = kernel(logits, y, -100, True)
    assert_within_2x("loss", losses, plain.detach(), per_row.detach())
    scored = y != -100
    lse_ref = torch.logsumexp(z64.detach(), -1) * scored
    assert_within_2x("lse", lse, torch.logsumexp(z32.detach(), -1) * scored, lse_ref)
    assert_within_2x("grad", logits.clone(), plain_grad.to(dtype), grad_ref)
    assert (losses[::7] == 0).all() and (logits[::7] == 0).all()
    assert (buffer[:, :3] == 1234).all() and (buffer[:, 3 + vocab:] == 1234).all()
    fresh = torch.randn(n, vocab, device="cuda").to(dtype)
    before = fresh.clone()
    again, _ = kernel(fresh, y, -100, False)
    assert torch.equal(fresh, before)  # the loss alone leaves the logits as they are
    # fp32 sums over the row: a few eps of the largest logit
    torch.testing.assert_close(again, F.cross_entropy(fresh.float(), y, reduction="none"), rtol=1e-5,
                               atol=1e-5 * fresh.float().abs().max().item())


def test_cross_entropy_chunk_gpu_bad_label_is_nan():
    kernel = _cpp_kernel("cross_entropy_chunk")
    logits = torch.randn(3, 100, device="cuda")
    losses, _ = kernel(logits, torch.tensor([5, 100, -100], device="cuda"), -100, False)
    assert not losses[0].isnan() and losses[1].isnan() and losses[2] == 0


# (B, Tq, H, Hkv, S, D, window, pad) with the launcher's choice: OLMo 7B's MHA decode step (1 row per block, 9
# splits of 4096 slots); a GQA group of 5 x 3 new tokens (15 rows: 4 row chunks, 3 splits); head dim 256 in fp32
# (two 16-byte vectors a lane) under a window of 700 (2 splits of its span); head dim 80 with unaligned rows (scalar
# loads), one split (the block writes out, no workspace); head dim 40, 3 splits.
DECODE_CASES = [
    (1, 1, 32, 32, 4096, 128, None, 0),
    (3, 3, 40, 8, 2048, 128, None, 0),
    (2, 1, 8, 2, 1500, 256, 700, 0),
    (4, 2, 6, 3, 300, 80, None, 1),
    (2, 1, 4, 1, 900, 40, None, 0),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
def test_decode_attention_gpu_against_float64(case, dtype):
    """Cache slots the kernel must not read hold NaN (past each sequence's length; before a window)."""
    kernel = _cpp_kernel("decode_attention")
    B, Tq, H, Hkv, S, D, window, pad = case
    q, k, v, seqlens, clean_k, clean_v = decode_inputs(B, Tq, H, Hkv, S, D, window, pad, dtype, device="cuda")
    got = kernel(q, k, v, seqlens, None, window)
    same = reference.decode_attention(q, clean_k, clean_v, seqlens, None, window)
    ref = reference.decode_attention(q.double(), clean_k.double(), clean_v.double(), seqlens, None, window)
    assert_within_2x("out", got, same, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [(2, 301, 301, 8, 2, 128, True, 0.75, None), (1, 77, 200, 4, 4, 64, True, None, 64),
                                  (1, 200, 77, 4, 1, 80, False, 0.75, None),
                                  (1, 129, 129, 2, 2, 256, True, None, None)], ids=str)
def test_attention_bwd_gpu_against_float64(case, dtype):
    """The tensor-core backward (csrc/kernels/attention_bwd.cu) through the binding, its out and lse from float64
    (not from a GPU forward): several key/query blocks, GQA, rows without keys, a window, every tiling class."""
    from test_gpu_emulation_attention_bwd import reference_grads, reference_lse

    B, Tq, Tk, H, Hkv, D, causal, clip, window = case
    scale = D ** -0.5
    q = torch.randn(B, Tq, H + 1, D, device="cuda")[:, :, 1:].to(dtype)  # strided heads
    k = torch.randn(B, Hkv, Tk, D, device="cuda").transpose(1, 2).to(dtype)  # head-major
    v = torch.randn(B, Hkv, Tk, D, device="cuda").transpose(1, 2).to(dtype)
    dout = torch.randn(B, Tq, H, D, device="cuda").to(dtype)
    ref = reference_grads(q.double(), k.double(), v.double(), dout.double(), causal, clip, scale, window)
    same = reference_grads(q, k, v, dout, causal, clip, scale, window)
    lse = reference_lse(q, k, causal, clip, scale, window).float().contiguous()
    got = torch.ops.olmo_fast_C.attention_bwd(dout, q, k, v, ref[0].to(dtype), lse, causal, clip, scale, window)
    for name, g, s, r in zip(("dq", "dk", "dv"), got, same[1:], ref[1:]):
        assert_within_2x(name, g, s, r)
    if clip is not None:
        for x, grad in zip((q, k, v), got):
            assert (grad[x.abs() > clip] == 0).all()


# (B, Tq, Tk, H, Hkv, D, causal, clip, window, layout): each head-dim instance (D <= 64, 128, 256), GQA groups of
# 4 and 2, Tq < Tk and Tq > Tk (rows without keys), windows across many key blocks, the model's packed qkv.
ATTENTION_CASES = [(2, 300, 300, 8, 2, 128, True, 0.75, None, "packed"),
                   (1, 257, 513, 4, 4, 64, False, None, None, "heads-major"),
                   (2, 200, 100, 4, 1, 96, True, 0.75, None, "contiguous"),
                   (1, 1000, 1000, 4, 2, 128, True, None, 256, "packed"),
                   (1, 130, 130, 2, 1, 256, True, 0.75, None, "heads-major"),
                   (1, 777, 777, 2, 2, 40, True, None, 1, "contiguous")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=str)
def test_attention_fwd_gpu_against_float64(case, dtype):
    """The extension's op itself (the Python dispatch registers cpp attention for the GPU once its backward has a
    GPU kernel too): out and lse, checked as under the emulation (tests/test_gpu_emulation_attention.py)."""
    B, Tq, Tk, H, Hkv, D, causal, clip, window, layout = case
    q, k, v = attention_inputs(B, Tq, Tk, H, Hkv, D, dtype, layout, spread=2.0 if clip else 1.0, device="cuda")
    out, lse = torch.ops.olmo_fast_C.attention_fwd(q, k, v, causal, clip, D ** -0.5, window)
    check_attention_fwd(out, lse, q, k, v, causal, clip, window)
