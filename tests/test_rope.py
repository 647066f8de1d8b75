"""RoPE kernel (NeoX rotate-half and GPT-J interleaved layouts), forward + backward (the inverse rotation), vs
float64 PyTorch (`ops.reference.rope` with float64 angles) within flash-attention's rule
(`conftest.assert_within_2x`), never NaN, NaN-poisoned outputs. Covers positions `[T]` / `[B, T]` / an int
offset / a `[B]` offset, one head, T=1, odd head dims, and q/k that are strided views of a fused projection.
"""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, assert_within_2x, poisoned_allocations, require_kernel_where_registered

from olmo_fast import ops

BACKENDS = ["triton", "cpp"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, T, Hq, Hk, D) -> how positions are given (all five kinds covered, each twice or more)
SHAPES = {(1, 1, 1, 1, 2): ("none", "offset"), (2, 5, 3, 1, 6): ("offset_per_seq", "positions_BT"),
          (1, 7, 4, 2, 34): ("positions_T", "offset"), (2, 3, 2, 2, 128): ("none", "positions_BT", "offset_per_seq"),
          (1, 2, 1, 1, 10): ("positions_T",)}


def kernel_name(interleaved: bool) -> str:
    return "rope_interleaved" if interleaved else "rope"


def position_kwargs(kind: str, B: int, T: int) -> dict:
    return {
        "none": {},
        "offset": {"offset": 1000},
        "offset_per_seq": {"offset": torch.tensor([3, 2047][:B], device=DEVICE)},
        "positions_T": {"positions": torch.randperm(4096, device=DEVICE)[:T]},
        "positions_BT": {"positions": torch.randint(0, 4096, (B, T), device=DEVICE)},
    }[kind]


def fused_qk(B, T, Hq, Hk, D, dtype):
    """q and k as the projection split leaves them: views of one [B, T, (Hq + 2 Hk) D] buffer."""
    qkv = torch.randn(B, T, (Hq + 2 * Hk) * D, device=DEVICE).to(dtype)
    q, k, _ = qkv.split((Hq * D, Hk * D, Hk * D), dim=-1)
    return q.view(B, T, Hq, D), k.view(B, T, Hk, D)


def run(q, k, dq, dk, backend, **kwargs):
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    rq, rk = ops.rope(q, k, backend=backend, **kwargs)
    return [rq, rk, *torch.autograd.grad((rq, rk), (q, k), (dq, dk))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
def test_against_float64(backend, dtype, shape, interleaved):
    require_kernel_where_registered(kernel_name(interleaved), backend)
    B, T, Hq, Hk, D = shape
    q, k = fused_qk(B, T, Hq, Hk, D, dtype)
    dq = torch.randn(B, Hq, T, D, device=DEVICE).transpose(1, 2).to(dtype)  # head-major gradient
    dk = torch.randn(B, T, Hk, D, device=DEVICE).to(dtype)
    for kind in SHAPES[shape]:
        kwargs = dict(position_kwargs(kind, B, T), theta=500000.0 if kind == "offset" else 10000.0,
                      interleaved=interleaved)
        with poisoned_allocations():
            got = run(q, k, dq, dk, backend, **kwargs)
        same = run(q, k, dq, dk, "torch", **kwargs)
        ref = run(q.double(), k.double(), dq.double(), dk.double(), "torch", **kwargs)
        for name, g, s, r in zip(("q", "k", "dq", "dk"), got, same, ref):
            assert_within_2x(f"{name} ({kind})", g, s, r)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inverse_undoes_rotation(backend):
    """The backward is the inverse rotation: applying it to the forward output gives the input back."""
    require_kernel_where_registered("rope", backend)
    from olmo_fast.ops.rotary import _rope

    q, k = torch.randn(2, 9, 3, 16, device=DEVICE), torch.randn(2, 9, 1, 16, device=DEVICE)
    rq, rk = ops.rope(q, k, offset=77, backend=backend)
    bq, bk = _rope(rq, rk, None, 77, 10000.0, True, False, backend)
    torch.testing.assert_close(bq, q, rtol=0, atol=1e-5)
    torch.testing.assert_close(bk, k, rtol=0, atol=1e-5)
    assert (rq - q).abs().max() > 0.1  # and it did rotate


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_positions(backend):
    require_kernel_where_registered("rope", backend)
    q = torch.randn(1, 4, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="positions"):
        ops.rope(q, q, positions=torch.arange(5, device=DEVICE), backend=backend)
