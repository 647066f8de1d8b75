"""OLMo 2's fused prologue (split -> QK-RMSNorm over all heads -> RoPE) of every compiled backend, forward and
backward (dqkv and both weight gradients), against float64 PyTorch (`reference.qk_norm_rope` in float64) by
flash-attention's 2x rule (`conftest.assert_within_2x`), with NaN-poisoned outputs: GQA, one head, T = 1, odd widths,
a strided qkv (a slice of a wider buffer) and strided gradients, every positions form, yarn scaling, fp32 master
weights under a bf16 input (autocast's case)."""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, assert_within_2x, poisoned_allocations, require_kernel_where_registered

from olmo_fast import ops
from olmo_fast.rope_scaling import RopeScaling

BACKENDS = ["triton", "cpp"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
YARN = RopeScaling(rope_type="yarn", factor=4.0, original_max_position_embeddings=16)
# (B, T, Hq, Hkv, D, positions, scaling)
CASES = [
    (1, 1, 1, 1, 2, "none", None),
    (2, 5, 4, 2, 6, "offset_per_seq", YARN),
    (1, 4, 3, 1, 34, "offset", None),
    (2, 3, 2, 2, 64, "positions_BT", YARN),
    (1, 6, 5, 5, 10, "positions_T", None),
]


def position_kwargs(kind, B, T):
    return {"none": {}, "offset": {"offset": 513},
            "offset_per_seq": {"offset": torch.tensor([7, 1900][:B], device=DEVICE)},
            "positions_T": {"positions": torch.randperm(2048, device=DEVICE)[:T]},
            "positions_BT": {"positions": torch.randint(0, 4096, (B, T), device=DEVICE)}}[kind]


def run(qkv, q_weight, k_weight, grads, backend, **kwargs):
    inputs = [t.detach().requires_grad_() for t in (qkv, q_weight, k_weight)]
    outs = ops.qk_norm_rope(*inputs, backend=backend, **kwargs)
    return [*outs, *torch.autograd.grad(outs, inputs, grads)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_against_float64(backend, dtype, case):
    require_kernel_where_registered("qk_norm_rope_fwd", backend)
    B, T, Hq, Hkv, D, kind, scaling = case
    width = (Hq + 2 * Hkv) * D
    qkv = (3 * torch.randn(B, T, width + 4, device=DEVICE))[..., 3:width + 3].to(dtype)
    q_weight = torch.empty(Hq * D, device=DEVICE).uniform_(0.5, 1.5).to(dtype)
    k_weight = torch.empty(Hkv * D, device=DEVICE).uniform_(0.5, 1.5).to(dtype)
    grads = (torch.randn(B, Hq, T, D, device=DEVICE).transpose(1, 2).to(dtype),  # head-major, as attention's
             torch.randn(B, T, Hkv, D + 1, device=DEVICE)[..., 1:].to(dtype),
             torch.randn(B, T, Hkv, D, device=DEVICE).to(dtype))
    kwargs = dict(n_heads=Hq, n_kv_heads=Hkv, eps=1e-6, theta=500000.0, rope_scaling=scaling,
                  **position_kwargs(kind, B, T))
    with poisoned_allocations():
        got = run(qkv, q_weight, k_weight, grads, backend, **kwargs)
    same = run(qkv, q_weight, k_weight, grads, "torch", **kwargs)
    ref = run(qkv.double(), q_weight.double(), k_weight.double(), tuple(g.double() for g in grads), "torch", **kwargs)
    for name, g, s, r in zip(("q", "k", "v", "dqkv", "dq_weight", "dk_weight"), got, same, ref):
        assert_within_2x(name, g, s, r)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_weights_with_a_bf16_input(backend):
    """Under autocast the projection output is bf16 while the norm weights stay fp32: the op takes them as they are
    and returns fp32 weight gradients."""
    require_kernel_where_registered("qk_norm_rope_fwd", backend)
    qkv = torch.randn(2, 5, 4 * 16, device=DEVICE).to(torch.bfloat16)
    weights = [torch.empty(n, device=DEVICE).uniform_(0.5, 1.5) for n in (32, 16)]
    grads = [torch.randn(2, 5, h, 16, device=DEVICE).to(torch.bfloat16) for h in (2, 1, 1)]
    kwargs = dict(n_heads=2, n_kv_heads=1, theta=10000.0)
    got = run(qkv, *weights, grads, backend, **kwargs)
    ref = run(qkv.double(), *(w.double() for w in weights), [g.double() for g in grads], "torch", **kwargs)
    assert [t.dtype for t in got] == [torch.bfloat16] * 4 + [torch.float32] * 2
    for name, g, r in zip(("q", "k", "v", "dqkv", "dq_weight", "dk_weight"), got, ref):
        scale = r.abs().max().item()
        assert (g.double() - r).abs().max().item() <= 2 * 2 ** -8 * scale, name  # bf16 rounding, twice


def test_bad_inputs_raise():
    qkv = torch.randn(1, 3, 40)
    with pytest.raises(ValueError, match="q_weight"):
        ops.qk_norm_rope(qkv, torch.ones(8), torch.ones(8), n_heads=3, n_kv_heads=1)
    with pytest.raises(ValueError, match="heads"):
        ops.qk_norm_rope(qkv, torch.ones(24), torch.ones(8), n_heads=3, n_kv_heads=2)
    with pytest.raises(ValueError, match="even head dim"):
        ops.qk_norm_rope(torch.randn(1, 3, 15), torch.ones(9), torch.ones(3), n_heads=3, n_kv_heads=1)
