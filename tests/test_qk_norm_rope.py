"""OLMo 2/3's fused QK-RMSNorm + RoPE prologue (`ops.qk_norm_rope`) forward + backward (dqkv and both weight
gradients) vs float64 PyTorch (`ops.reference.qk_norm_rope` in float64) within flash-attention's rule
(`conftest.assert_within_2x`), never NaN, NaN-poisoned outputs; GQA, odd head counts, D = 64 and 128, T = 1, batch
of one, every kind of positions, yarn and linear scaling (attention factor != 1), a qkv slice of a wider buffer,
strided (dq, dk, dv), parts wider than one tile (the two-pass path) and fp32 weights under 16-bit activations;
and in fp32 against transformers' own Olmo2RMSNorm + Olmo2RotaryEmbedding + apply_rotary_pos_emb, gradients
included.
"""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, assert_within_2x, poisoned_allocations, require_kernel_where_registered

from olmo_fast import ops
from olmo_fast.rope_scaling import RopeScaling

BACKENDS = ["triton", "cpp"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
YARN = RopeScaling(rope_type="yarn", factor=8.0, original_max_position_embeddings=64)  # attention factor 1.208
LINEAR = RopeScaling(rope_type="linear", factor=4.0)
# (B, T, Hq, Hkv, D, positions, rope_scaling)
CASES = [
    (1, 1, 1, 1, 2, "none", None),
    (2, 5, 4, 2, 6, "offset_per_seq", YARN),
    (1, 4, 3, 1, 34, "offset", None),
    (2, 3, 3, 3, 64, "positions_BT", LINEAR),
    (1, 6, 5, 5, 10, "positions_T", YARN),
    (1, 2, 66, 2, 128, "offset", None),  # q part 66 x 128: wider than one single-pass tile, two passes over the row
]


def case_id(case) -> str:
    B, T, Hq, Hkv, D, kind, scaling = case
    return f"B{B}-T{T}-H{Hq}/{Hkv}-D{D}-{kind}-{scaling.rope_type if scaling else 'default'}"


def make_qkv(B, T, Hq, Hkv, D, dtype):
    """A strided view of a wider buffer, 3 N(0, 1) (the norm must bring it back)."""
    width = (Hq + 2 * Hkv) * D
    return (3 * torch.randn(B, T, width + 4, device=DEVICE)[..., 3:width + 3]).to(dtype)


def make_weights(Hq, Hkv, D, dtype):
    return tuple((1 + 0.5 * torch.randn(h * D, device=DEVICE)).to(dtype) for h in (Hq, Hkv))


def make_grads(B, T, Hq, Hkv, D, dtype):
    """dq head-major (as attention's backward gives it), dk a slice, dv contiguous."""
    return (torch.randn(B, Hq, T, D, device=DEVICE).transpose(1, 2).to(dtype),
            torch.randn(B, T, Hkv, D + 1, device=DEVICE)[..., 1:].to(dtype),
            torch.randn(B, T, Hkv, D, device=DEVICE).to(dtype))


def position_kwargs(kind, B, T):
    return {"none": {}, "offset": {"offset": 513},
            "offset_per_seq": {"offset": torch.tensor([7, 1900][:B], device=DEVICE)},
            "positions_T": {"positions": torch.randperm(2048, device=DEVICE)[:T]},
            "positions_BT": {"positions": torch.randint(0, 4096, (B, T), device=DEVICE)}}[kind]


def run(qkv, weights, grads, backend, **kwargs):
    """(q, k, v, dqkv, dq_weight, dk_weight)."""
    inputs = [t.detach().requires_grad_() for t in (qkv, *weights)]
    outs = ops.qk_norm_rope(*inputs, backend=backend, **kwargs)
    return [*outs, *torch.autograd.grad(outs, inputs, grads)]


def check_against_float64(qkv, weights, grads, backend, **kwargs):
    with poisoned_allocations():
        got = run(qkv, weights, grads, backend, **kwargs)
    same = run(qkv, weights, grads, "torch", **kwargs)
    ref = run(qkv.double(), [w.double() for w in weights], [g.double() for g in grads], "torch", **kwargs)
    for name, g, s, r in zip(("q", "k", "v", "dqkv", "dq_weight", "dk_weight"), got, same, ref):
        assert_within_2x(name, g, s, r)
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_against_float64(backend, dtype, case):
    require_kernel_where_registered("qk_norm_rope_fwd", backend)
    B, T, Hq, Hkv, D, kind, scaling = case
    got = check_against_float64(make_qkv(B, T, Hq, Hkv, D, dtype), make_weights(Hq, Hkv, D, dtype),
                                make_grads(B, T, Hq, Hkv, D, dtype), backend, n_heads=Hq, n_kv_heads=Hkv,
                                theta=500000.0, rope_scaling=scaling, **position_kwargs(kind, B, T))
    assert got[4].dtype == got[5].dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_weights_with_half_activations(backend, dtype):
    """Under autocast the norm weights stay fp32 while the projection output is 16-bit: outputs in qkv's dtype,
    weight gradients in fp32."""
    require_kernel_where_registered("qk_norm_rope_fwd", backend)
    B, T, Hq, Hkv, D = 2, 3, 4, 2, 16
    got = check_against_float64(make_qkv(B, T, Hq, Hkv, D, dtype), make_weights(Hq, Hkv, D, torch.float32),
                                make_grads(B, T, Hq, Hkv, D, dtype), backend, n_heads=Hq, n_kv_heads=Hkv, offset=3)
    assert got[0].dtype == dtype and got[4].dtype == got[5].dtype == torch.float32


@pytest.mark.parametrize("tile", [16, 32])  # chunks of 2 and of 4 heads
def test_two_pass_rows(monkeypatch, tile):
    """Parts wider than the single-pass tile loop over chunks of heads (the last one ragged), summing squares first and
    normalising in a second pass; the weight gradients go through per-program partial rows in memory."""
    require_kernel_where_registered("qk_norm_rope_fwd", "triton")
    from olmo_fast.kernels import qk_norm_rope

    monkeypatch.setattr(qk_norm_rope, "SINGLE_PASS_TILE", tile)
    B, T, Hq, Hkv, D = 3, 5, 7, 3, 8
    assert not qk_norm_rope.part_tiles(Hq, Hkv, D)[-1]
    check_against_float64(make_qkv(B, T, Hq, Hkv, D, torch.float32), make_weights(Hq, Hkv, D, torch.float32),
                          make_grads(B, T, Hq, Hkv, D, torch.float32), "triton", n_heads=Hq, n_kv_heads=Hkv,
                          rope_scaling=YARN, offset=torch.tensor([0, 70, 3000], device=DEVICE))


def _hf_prologue(qkv, q_norm, k_norm, rotary, positions, Hq, Hkv, D):
    """transformers' Olmo2Attention prologue: q_norm / k_norm over the whole projections, apply_rotary_pos_emb."""
    from transformers.models.olmo2 import modeling_olmo2 as hf

    B, T, _ = qkv.shape
    q, k, v = qkv.split((Hq * D, Hkv * D, Hkv * D), dim=-1)
    cos, sin = rotary(qkv, positions)
    q, k = hf.apply_rotary_pos_emb(q_norm(q).view(B, T, Hq, D), k_norm(k).view(B, T, Hkv, D), cos, sin,
                                   unsqueeze_dim=2)
    return q, k, v.reshape(B, T, Hkv, D)


@pytest.mark.parametrize("backend", ["triton", "cpp"])
@pytest.mark.parametrize("rope", [{"rope_type": "default", "rope_theta": 500000.0},
                                  {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0,
                                   "original_max_position_embeddings": 16}], ids=lambda r: r["rope_type"])
def test_matches_transformers_olmo2(backend, rope):
    """fp32: outputs within 1e-5 and gradients (qkv, q_norm.weight, k_norm.weight) within 1e-4 of transformers'
    composition, relative to each tensor's largest magnitude."""
    require_kernel_where_registered("qk_norm_rope_fwd", backend)
    pytest.importorskip("transformers")
    from transformers import Olmo2Config
    from transformers.models.olmo2 import modeling_olmo2 as hf

    B, T, Hq, Hkv, D = 2, 7, 6, 2, 16
    config = Olmo2Config(hidden_size=Hq * D, num_attention_heads=Hq, num_key_value_heads=Hkv, rms_norm_eps=1e-6,
                         max_position_embeddings=64, rope_parameters=dict(rope))
    q_norm, k_norm = hf.Olmo2RMSNorm(Hq * D, 1e-6).to(DEVICE), hf.Olmo2RMSNorm(Hkv * D, 1e-6).to(DEVICE)
    with torch.no_grad():
        q_norm.weight.uniform_(0.5, 1.5)
        k_norm.weight.uniform_(0.5, 1.5)
    rotary = hf.Olmo2RotaryEmbedding(config).to(DEVICE)
    qkv = make_qkv(B, T, Hq, Hkv, D, torch.float32).requires_grad_()
    positions = torch.arange(T, device=DEVICE).expand(B, T) + torch.tensor([[0], [40]], device=DEVICE)
    grads = make_grads(B, T, Hq, Hkv, D, torch.float32)
    want = _hf_prologue(qkv, q_norm, k_norm, rotary, positions, Hq, Hkv, D)
    want_grads = torch.autograd.grad(want, (qkv, q_norm.weight, k_norm.weight), grads)
    got = ops.qk_norm_rope(qkv, q_norm.weight, k_norm.weight, n_heads=Hq, n_kv_heads=Hkv, eps=1e-6,
                           positions=positions, theta=500000.0, rope_scaling=RopeScaling.from_hf(rope, 64),
                           backend=backend)
    got_grads = torch.autograd.grad(got, (qkv, q_norm.weight, k_norm.weight), grads)
    for name, g, w, tol in [*zip("qkv", got, want, [1e-5] * 3),
                            *zip(("dqkv", "dq_weight", "dk_weight"), got_grads, want_grads, [1e-4] * 3)]:
        err = (g - w).abs().max().item()
        assert err <= tol * w.abs().max().item(), f"{name}: {err:.3g} off transformers' (max {w.abs().max():.3g})"


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiles_fullgraph_and_matches_eager(backend):
    """torch.compile(fullgraph=True) traces the op (its frequencies included) and its backward through the fake
    implementations; outputs and gradients equal eager's bitwise."""
    require_kernel_where_registered("qk_norm_rope_fwd", backend)
    torch._dynamo.reset()
    B, T, Hq, Hkv, D = 2, 3, 3, 1, 8
    inputs = [make_qkv(B, T, Hq, Hkv, D, torch.float32), *make_weights(Hq, Hkv, D, torch.float32)]
    grads = make_grads(B, T, Hq, Hkv, D, torch.float32)

    def prologue(qkv, wq, wk):
        return ops.qk_norm_rope(qkv, wq, wk, n_heads=Hq, n_kv_heads=Hkv, offset=5, theta=500000.0,
                                rope_scaling=YARN, backend=backend)

    def run(fn):
        leaves = [t.detach().requires_grad_() for t in inputs]
        outs = fn(*leaves)
        return [*outs, *torch.autograd.grad(outs, leaves, grads)]

    for e, c in zip(run(prologue), run(torch.compile(prologue, fullgraph=True, backend="aot_eager"))):
        assert torch.equal(c, e)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    """The custom ops' schema, fake (meta) implementations and autograd registration (torch.compile's view)."""
    require_kernel_where_registered("qk_norm_rope_fwd", backend)
    B, T, Hq, Hkv, D = 1, 3, 2, 1, 8
    qkv = make_qkv(B, T, Hq, Hkv, D, torch.float32).requires_grad_()
    wq, wk = (w.requires_grad_() for w in make_weights(Hq, Hkv, D, torch.float32))
    inv_freq = torch.rand(D // 2, device=DEVICE)
    torch.library.opcheck(torch.ops.olmo_fast.qk_norm_rope_fwd.default,
                          (qkv, wq, wk, Hq, Hkv, 1e-6, None, 5, inv_freq, 1.25, backend),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs(backend):
    require_kernel_where_registered("qk_norm_rope_fwd", backend)
    qkv, (wq, wk) = torch.randn(1, 2, 24, device=DEVICE), make_weights(1, 1, 8, torch.float32)
    with pytest.raises(ValueError, match="even head dim"):
        ops.qk_norm_rope(torch.randn(1, 2, 9, device=DEVICE), wq[:3], wk[:3], n_heads=1, n_kv_heads=1,
                         backend=backend)
    with pytest.raises(ValueError, match="k_weight"):
        ops.qk_norm_rope(qkv, wq, wk[:4], n_heads=1, n_kv_heads=1, backend=backend)
    with pytest.raises(ValueError, match="positions"):
        ops.qk_norm_rope(qkv, wq, wk, n_heads=1, n_kv_heads=1, positions=torch.arange(3, device=DEVICE),
                         backend=backend)
