"""The "cpp" backend's CUDA/HIP kernels for the attention prologue (`qkv_rope` forward and backward), the
cross-entropy chunk and the training attention forward (csrc/kernels/qkv_rope.cu, cross_entropy.cu,
attention_fwd.cu), on a GPU: against float64 PyTorch by the suite's rule (`conftest.assert_within_2x`: at most 2x
plain PyTorch's error in the same dtype), with NaN-poisoned outputs, on shapes that exercise the kernels' launch
choices (many tokens per block through the grid-stride loop; a vocabulary above and below the 16384 that switches
256 -> 1024 threads a row; attention's three head-dim instances and their tile sizes, many query and key blocks).

The shared op tests (tests/test_qkv_rope.py, tests/test_linear_cross_entropy.py) also run the "cpp" backend on
the GPU when one is present. Everything here is GPU-marked and skipped without CUDA/ROCm.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_within_2x
from test_gpu_emulation_attention import attention_inputs, check_attention_fwd

from olmo_fast import ops

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
