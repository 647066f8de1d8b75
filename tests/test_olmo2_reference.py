"""The "torch" backend's OLMo 2/3 pieces against transformers and against explicit float64 loops: RoPE scaling
(default, linear, yarn) vs transformers' ROPE_INIT_FUNCTIONS, the QK-norm prologue vs Olmo2Attention's q_norm /
k_norm + apply_rotary_pos_emb, the post-norm residual vs Olmo2RMSNorm, and sliding-window masks vs a per-element
loop of transformers' rule (key j visible to query i iff i - window < j <= i)."""
import math

import pytest
import torch
from tiny_hf import require_transformers

from olmo_fast import ops
from olmo_fast.errors import ConfigError
from olmo_fast.rope_scaling import RopeScaling, rope_frequencies


def _hf_rope(rope_parameters: dict, head_dim: int, max_positions: int):
    require_transformers()
    from transformers import Olmo2Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = Olmo2Config(hidden_size=head_dim * 2, num_attention_heads=2, max_position_embeddings=max_positions,
                         rope_parameters=dict(rope_parameters))
    return ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](config, "cpu")


@pytest.mark.parametrize("params", [
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 8.0, "original_max_position_embeddings": 8192},
    {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 8.0, "original_max_position_embeddings": 8192,
     "attention_factor": 1.2079441541679836, "beta_fast": 32, "beta_slow": 1},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 3.0, "original_max_position_embeddings": 512,
     "beta_fast": 16, "beta_slow": 2, "truncate": False},
], ids=lambda p: f"{p['rope_type']}-{p['factor']}-{len(p)}")
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rope_frequencies_match_transformers(params, head_dim):
    want_freq, want_factor = _hf_rope(params, head_dim, 65536)
    scaling = RopeScaling.from_hf(params, 65536)
    inv_freq, factor = rope_frequencies(head_dim, params["rope_theta"], scaling)
    torch.testing.assert_close(inv_freq, want_freq, rtol=2e-7, atol=0)
    assert factor == pytest.approx(want_factor, rel=1e-12)
    assert RopeScaling.from_hf(scaling.to_hf(params["rope_theta"]), 65536) == scaling


def test_rope_scaling_rejects_what_it_cannot_run():
    assert RopeScaling.from_hf(None) is None
    assert RopeScaling.from_hf({"rope_type": "default", "rope_theta": 1e4}) is None
    with pytest.raises(ConfigError, match="not supported"):
        RopeScaling.from_hf({"rope_type": "longrope", "factor": 2.0})
    with pytest.raises(ConfigError, match="not supported"):
        RopeScaling.from_hf({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8, "bogus": 1})
    with pytest.raises(ConfigError, match="original_max_position_embeddings"):
        RopeScaling.from_hf({"rope_type": "yarn", "factor": 2.0})


@pytest.mark.parametrize("scaled", [False, True])
def test_qk_norm_rope_reference_matches_olmo2_attention(scaled):
    require_transformers()
    from transformers import Olmo2Config
    from transformers.models.olmo2 import modeling_olmo2 as hf

    B, T, H, Hkv, D = 2, 11, 6, 2, 16
    rope = ({"rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0, "original_max_position_embeddings": 8}
            if scaled else {"rope_type": "default", "rope_theta": 500000.0})
    config = Olmo2Config(hidden_size=H * D, num_attention_heads=H, num_key_value_heads=Hkv, rms_norm_eps=1e-6,
                         max_position_embeddings=64, rope_parameters=rope)
    q_norm, k_norm = hf.Olmo2RMSNorm(H * D, 1e-6), hf.Olmo2RMSNorm(Hkv * D, 1e-6)
    with torch.no_grad():
        q_norm.weight.uniform_(0.5, 1.5)
        k_norm.weight.uniform_(0.5, 1.5)
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D) * 3
    positions = torch.arange(T).expand(B, T) + torch.tensor([[0], [5]])
    cos, sin = hf.Olmo2RotaryEmbedding(config)(qkv, positions)
    q, k, v = qkv.split((H * D, Hkv * D, Hkv * D), dim=-1)
    q = q_norm(q).view(B, T, H, D).transpose(1, 2)
    k = k_norm(k).view(B, T, Hkv, D).transpose(1, 2)
    want_q, want_k = hf.apply_rotary_pos_emb(q, k, cos, sin)
    got_q, got_k, got_v = ops.qk_norm_rope(qkv, q_norm.weight, k_norm.weight, n_heads=H, n_kv_heads=Hkv, eps=1e-6,
                                           positions=positions, theta=500000.0,
                                           rope_scaling=RopeScaling.from_hf(rope, 64), backend="torch")
    torch.testing.assert_close(got_q, want_q.transpose(1, 2), rtol=1e-5, atol=1e-5 * want_q.abs().max().item())
    torch.testing.assert_close(got_k, want_k.transpose(1, 2), rtol=1e-5, atol=1e-5 * want_k.abs().max().item())
    assert torch.equal(got_v, v.view(B, T, Hkv, D))


def test_rms_norm_add_reference_matches_olmo2_post_norm():
    require_transformers()
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    norm = Olmo2RMSNorm(100, 1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    for dtype in (torch.float32, torch.bfloat16):
        x, residual = torch.randn(3, 7, 100, dtype=dtype) * 4, torch.randn(3, 7, 100, dtype=dtype)
        got = ops.rms_norm_add(x, norm.weight.to(dtype), residual, eps=1e-6, backend="torch")
        assert torch.equal(got, residual + norm.to(dtype)(x))


def _windowed_f64(q, k, v, window, query_pos):
    """Attention by explicit loops over (query, key): float64, transformers' sliding-window rule."""
    B, Tq, H, D = q.shape
    n_rep = H // k.shape[2]
    out = torch.zeros(B, Tq, H, D, dtype=torch.float64)
    for b in range(B):
        for t in range(Tq):
            i = int(query_pos[b, t])
            keys = [j for j in range(k.shape[1]) if j <= i and (window is None or j > i - window)]
            for h in range(H):
                scores = torch.stack([q[b, t, h].double() @ k[b, j, h // n_rep].double() for j in keys])
                weights = torch.softmax(scores / math.sqrt(D), 0)
                out[b, t, h] = sum(w * v[b, j, h // n_rep].double() for w, j in zip(weights, keys))
    return out


@pytest.mark.parametrize("window", [1, 3, 7, 40])
def test_windowed_attention_reference(window):
    B, Tq, Tk, H, Hkv, D = 2, 9, 13, 4, 2, 8
    q, k, v = torch.randn(B, Tq, H, D), torch.randn(B, Tk, Hkv, D), torch.randn(B, Tk, Hkv, D)
    got = ops.attention(q, k, v, window=window, backend="torch")
    want = _windowed_f64(q, k, v, window, (Tk - Tq + torch.arange(Tq)).expand(B, Tq))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * v.abs().max().item())


@pytest.mark.parametrize("window", [1, 4, 64])
def test_windowed_decode_reference(window):
    B, Tq, S, H, Hkv, D = 3, 2, 16, 4, 1, 8
    q, k, v = torch.randn(B, Tq, H, D), torch.randn(B, S, Hkv, D), torch.randn(B, S, Hkv, D)
    seqlens = torch.tensor([2, 9, 16])
    got = ops.decode_attention(q, k, v, seqlens, window=window, backend="torch")
    want = _windowed_f64(q, k, v, window, seqlens[:, None] - Tq + torch.arange(Tq))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * v.abs().max().item())


@pytest.mark.parametrize("window", [0, -2, 2.5, True])
def test_bad_window_raises(window):
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="window"):
        ops.attention(q, q, q, window=window)
    with pytest.raises(ValueError, match="causal"):
        ops.attention(q, q, q, causal=False, window=2)
