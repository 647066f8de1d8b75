"""The `olmo_fast.nn` modules on every backend against float64 PyTorch: outputs and the gradients of every
input and parameter, by flash-attention's rule (error <= 2x plain fp32 PyTorch's + rounding slack; no NaN).
Odd sizes, non-contiguous inputs, batches of one; `SwiGLUMLP` and `apply_rope` also against transformers'
Llama modules they replace."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, assert_within_2x, require_kernel_where_registered
from torch.func import functional_call

from olmo_fast import nn as ofnn

BACKENDS = ["torch", "triton", "cpp"]


@pytest.fixture(autouse=True)
def _on_device():
    with torch.device(DEVICE):
        yield


def _require(backend: str, *kernels: str) -> None:
    if backend != "torch":
        for name in kernels:
            require_kernel_where_registered(name, backend)


def _check(module_fn, plain_fn, *inputs):
    """`module_fn(*inputs)` (fp32) vs `plain_fn` in fp32 and in float64: the output and every input gradient."""
    upstream = None
    results = []
    for fn, dtype in ((module_fn, torch.float32), (plain_fn, torch.float32), (plain_fn, torch.float64)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
        out = fn(*leaves)
        out = out if isinstance(out, tuple) else (out,)
        if upstream is None:
            upstream = [torch.randn_like(o, dtype=torch.float64) for o in out]
        grads = torch.autograd.grad(out, leaves, [u.to(dtype) for u in upstream])
        results.append([o.detach() for o in out] + [g.to(dtype) for g in grads])
    for i, (got, same, ref) in enumerate(zip(*results)):
        assert_within_2x(f"result {i}", got, same, ref)


def _rows(*shape):
    """A non-contiguous `[..., C]` view (every other row of a taller buffer)."""
    base = torch.randn(shape[0] * 2, *shape[1:])
    return base[::2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_non_parametric_and_affine(backend):
    _require(backend, "layer_norm_fwd", "norm_fwd")
    x, res = _rows(3, 5, 37), torch.randn(3, 5, 37)
    plain = ofnn.LayerNorm(backend=backend)
    _check(plain, lambda t: F.layer_norm(t, t.shape[-1:], eps=1e-5), x)
    _check(lambda a, b: plain(a, b), lambda a, b: (F.layer_norm(a + b, a.shape[-1:], eps=1e-5), a + b), x, res)
    affine = ofnn.LayerNorm(37, elementwise_affine=True, backend=backend)
    w, b = torch.rand(37) + 0.5, torch.randn(37)
    _check(lambda t, w_, b_: functional_call(affine, {"weight": w_, "bias": b_}, (t,)),
           lambda t, w_, b_: F.layer_norm(t, t.shape[-1:], w_, b_, 1e-5), x[:1], w, b)
    assert ofnn.LayerNorm(8, elementwise_affine=True, bias=False).bias is None
    with pytest.raises(ValueError, match="normalized_shape"):
        ofnn.LayerNorm(elementwise_affine=True)


def _rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm(backend):
    _require(backend, "norm_fwd")
    norm = ofnn.RMSNorm(37, eps=1e-6, backend=backend)
    x, w, res = _rows(2, 7, 37), torch.rand(37) + 0.5, torch.randn(2, 7, 37)
    _check(lambda t, w_: functional_call(norm, {"weight": w_}, (t,)), _rms, x, w)
    _check(lambda t, r, w_: functional_call(norm, {"weight": w_}, (t, r)),
           lambda t, r, w_: (_rms(t + r, w_), t + r), x, res, w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_swiglu_layouts(backend):
    _require(backend, "swiglu_fwd", "silu_mul_fwd")
    fused = ofnn.SwiGLU(backend=backend)
    _check(fused, lambda h: F.silu(h[..., 21:]) * h[..., :21], _rows(3, 42))  # [up | gate], H = 21
    mlp = ofnn.SwiGLUMLP(13, 21, backend=backend)
    params = {k: torch.randn_like(v) / 3 for k, v in mlp.named_parameters()}
    names = list(params)

    def plain(x, *ws):
        p = dict(zip(names, ws))
        return F.linear(F.silu(F.linear(x, p["gate_proj.weight"])) * F.linear(x, p["up_proj.weight"]),
                        p["down_proj.weight"])

    _check(lambda x, *ws: functional_call(mlp, dict(zip(names, ws)), (x,)), plain, _rows(1, 5, 13),
           *params.values())


def test_swiglu_mlp_is_a_drop_in_for_llama_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    llama = LlamaMLP(LlamaConfig(hidden_size=14, intermediate_size=21, num_attention_heads=1))
    ours = ofnn.SwiGLUMLP(14, 21)
    ours.load_state_dict(llama.state_dict())  # the same parameter names
    x = torch.randn(2, 3, 14)
    torch.testing.assert_close(ours(x), llama(x), rtol=1e-6, atol=1e-6)


def _rope_complex(t, positions, theta, interleaved, dtype):
    """Rotation as complex multiplication in `dtype`, pairs (i, i + D/2) or, interleaved, (2i, 2i + 1)."""
    t = t.to(dtype)
    half = t.shape[-1] // 2
    angle = positions.to(dtype)[..., None] * theta ** (-torch.arange(half, dtype=dtype) * 2 / t.shape[-1])
    angle = angle[..., None, :]  # broadcast over heads: [..., T, 1, D/2]
    pairs = torch.complex(t[..., 0::2], t[..., 1::2]) if interleaved else torch.complex(t[..., :half], t[..., half:])
    turned = pairs * torch.polar(torch.ones_like(angle), angle)
    if interleaved:
        return torch.stack((turned.real, turned.imag), dim=-1).flatten(-2)
    return torch.cat((turned.real, turned.imag), dim=-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_embedding(backend, interleaved):
    _require(backend, "rope_interleaved" if interleaved else "rope")
    rotary = ofnn.RotaryEmbedding(theta=500.0, interleaved=interleaved, backend=backend)
    q, k = _rows(2, 5, 3, 10).requires_grad_(), torch.randn(2, 5, 1, 10)  # GQA: one key head
    positions = torch.tensor([[3, 4, 5, 6, 7], [0, 1, 2, 9, 11]])
    got_q, got_k = rotary(q, k, positions)
    # the rotation is orthogonal: the gradient is the upstream gradient turned back (negated positions)
    upstream = torch.randn(2, 5, 3, 10)
    (dq,) = torch.autograd.grad(got_q, (q,), upstream)
    for name, got, t, pos in (("q", got_q, q, positions), ("k", got_k, k, positions), ("dq", dq, upstream, -positions)):
        same = _rope_complex(t.detach(), pos, 500.0, interleaved, torch.float32)
        assert_within_2x(name, got.detach(), same, _rope_complex(t.detach(), pos, 500.0, interleaved, torch.float64))


def test_apply_rope_matches_transformers_llama():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(hidden_size=48, num_attention_heads=4, rope_theta=10000.0)
    q, k = torch.randn(1, 4, 6, 12), torch.randn(1, 2, 6, 12)  # transformers' [B, H, T, D]
    positions = torch.arange(6)[None] + 5
    cos, sin = LlamaRotaryEmbedding(config)(q, positions)
    want = apply_rotary_pos_emb(q, k, cos, sin)
    got = ofnn.apply_rope(q, k, positions=positions[0], theta=10000.0, heads_first=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_qkv_rope_prologue(backend):
    """OLMo's prologue: clamp the fused projection, split q | k | v, rotate q and k (NeoX halves)."""
    _require(backend, "qkv_rope_fwd")
    prologue = ofnn.QKVRope(n_heads=3, n_kv_heads=1, clip=0.8, theta=500.0, backend=backend)
    positions = torch.tensor([[3, 4, 5, 6, 7], [0, 1, 2, 9, 11]])

    def plain(qkv):
        q, k, v = qkv.clamp(-0.8, 0.8).split((30, 10, 10), dim=-1)
        q, k, v = q.unflatten(-1, (3, 10)), k.unflatten(-1, (1, 10)), v.unflatten(-1, (1, 10))
        return _rope_complex(q, positions, 500.0, False, q.dtype), _rope_complex(k, positions, 500.0, False, k.dtype), v

    _check(lambda qkv: prologue(qkv, positions), plain, torch.randn(2, 5, 50))


def _attention(q, k, v, clip):
    q, k, v = (t.clamp(-clip, clip) for t in (q, k, v))
    k, v = (t.repeat_interleave(q.shape[2] // t.shape[2], dim=2) for t in (k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).tril(k.shape[1] - q.shape[1])  # bottom-right
    return torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_with_clip(backend):
    _require(backend, "attention_fwd")
    attention = ofnn.Attention(clip=1.5, backend=backend)
    q, k, v = torch.randn(1, 7, 4, 16) * 2, torch.randn(1, 7, 2, 16) * 2, torch.randn(1, 7, 2, 16) * 2
    _check(attention, lambda a, b, c: _attention(a, b, c, 1.5), q, k, v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_decodes_over_a_cache(backend):
    """`Attention()(q, k_cache, v_cache, seqlens)`: sequence b's new query i sees cache slots 0 .. seqlens[b] - Tq + i;
    slots past seqlens[b] hold garbage (1e4) that must not be read. float64 attention of each sequence's valid keys."""
    _require(backend, "decode_attention")
    attention = ofnn.Attention(backend=backend)
    q, k, v = torch.randn(2, 2, 4, 16), torch.full((2, 9, 2, 16), 1e4), torch.full((2, 9, 2, 16), 1e4)
    seqlens = torch.tensor([5, 9], dtype=torch.int32)
    for b, n in enumerate(seqlens.tolist()):
        k[b, :n], v[b, :n] = torch.randn(n, 2, 16), torch.randn(n, 2, 16)
    got = attention(q, k, v, seqlens)
    for b, n in enumerate(seqlens.tolist()):
        kb, vb = k[b:b + 1, :n], v[b:b + 1, :n]
        same = _attention(q[b:b + 1], kb, vb, math.inf)
        ref = _attention(*(t.double() for t in (q[b:b + 1], kb, vb)), math.inf)
        assert_within_2x(f"sequence {b}", got[b:b + 1], same, ref)
    with pytest.raises(ValueError, match="causal and unclipped"):
        ofnn.Attention(clip=1.0, backend=backend)(q, k, v, seqlens)


def test_set_backend_reaches_every_op_module():
    model = torch.nn.Sequential(ofnn.LayerNorm(), torch.nn.Linear(4, 8),
                                torch.nn.Sequential(ofnn.SwiGLU(backend="cpp"), ofnn.Attention(backend="triton")))
    assert ofnn.set_backend(model, "torch") is model
    assert [m.backend for m in model.modules() if isinstance(m, ofnn.OpModule)] == ["torch"] * 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy_module(backend):
    _require(backend, "cross_entropy_chunk")
    loss = ofnn.LinearCrossEntropy(reduction="sum", chunk_size=4, backend=backend)
    labels = torch.randint(0, 29, (2, 5))
    labels[0, 1] = -100

    def plain(x, w):
        logits = x @ w.t()
        return F.cross_entropy(logits.reshape(-1, 29), labels.reshape(-1), reduction="sum")

    _check(lambda x, w: loss(x, w, labels), plain, torch.randn(2, 5, 11), torch.randn(29, 11))
    with pytest.raises(ValueError, match="reduction"):
        ofnn.LinearCrossEntropy(reduction="none")
