"""The "torch" backend: plain PyTorch implementations of every op, and the numerical reference for tests.

They follow OLMo's semantics exactly (allenai/OLMo's `olmo.model`, transformers' Olmo): LayerNorm statistics in
fp32, RoPE angles and rotation in fp32 with the rotate-half layout, clamp before the split and before RoPE, SwiGLU
on `[x | gate]`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..rope_scaling import RopeScaling, rope_frequencies


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """fp32 for the low-precision dtypes; float64 stays float64 (the tests' reference precision)."""
    return t if t.dtype == torch.float64 else t.float()


def layer_norm(x: torch.Tensor, eps: float = 1e-5, residual: torch.Tensor | None = None,
               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None):
    """LayerNorm in fp32 (OLMo's is non-parametric: no weight, no bias); output in x's dtype.

    With `residual`, returns `(LN(x + residual), x + residual)`.
    """
    h = x if residual is None else x + residual
    w = None if weight is None else _upcast(weight)
    b = None if bias is None else _upcast(bias)
    y = F.layer_norm(_upcast(h), h.shape[-1:], w, b, eps).to(h.dtype)
    return y if residual is None else (y, h)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6,
             residual: torch.Tensor | None = None):
    """RMSNorm in fp32 (`h * rsqrt(mean(h^2) + eps) * weight`), output in x's dtype.

    With `residual`, returns `(RMSNorm(x + residual), x + residual)`.
    """
    h = x if residual is None else x + residual
    h32 = _upcast(h)
    y = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * _upcast(weight)
    y = y.to(h.dtype)
    return y if residual is None else (y, h)


def rms_norm_add(x: torch.Tensor, weight: torch.Tensor | None, residual: torch.Tensor, eps: float = 1e-6
                 ) -> torch.Tensor:
    """OLMo 2's post-norm residual, norm then add: `residual + RMSNorm(x) * weight` (the norm in x's dtype)."""
    return residual + rms_norm(x, weight, eps)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """OLMo's fused layout: `h = [x | gate]` along the last dim -> `silu(gate) * x`."""
    x, gate = h.chunk(2, dim=-1)
    return F.silu(gate) * x


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The separate gate/up layout (Llama's MLP): `silu(gate) * up`."""
    return F.silu(gate) * up


def rope_positions(seq_len: int, offset: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Positions `offset .. offset+seq_len-1` ([T]) or, for a per-sequence offset tensor [B], ([B, T])."""
    steps = torch.arange(seq_len, device=device)
    if isinstance(offset, torch.Tensor):
        return offset.to(device=device, dtype=torch.long).view(-1, 1) + steps
    return steps + offset


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype = torch.float32,
                 scaling: RopeScaling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (fp32, or `dtype`) of shape `positions.shape + [head_dim]` (halves repeat: NeoX layout), with
    the frequencies and cos/sin factor of `scaling` (`rope_scaling.py`)."""
    inv_freq, factor = rope_frequencies(head_dim, theta, scaling, positions.device, dtype)
    freqs = positions.to(dtype)[..., None] * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)
    if factor == 1.0:
        return angles.cos(), angles.sin()
    return angles.cos() * factor, angles.sin() * factor


def _rotate_half(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _rotate_pairs(t: torch.Tensor) -> torch.Tensor:
    """The interleaved (GPT-J) counterpart of `_rotate_half`: (t0, t1) -> (-t1, t0) for each adjacent pair."""
    even, odd = t[..., 0::2], t[..., 1::2]
    return torch.stack((-odd, even), dim=-1).flatten(-2)


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor | None = None,
         offset: int | torch.Tensor = 0, theta: float = 10000.0, interleaved: bool = False,
         scaling: RopeScaling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q `[B, T, Hq, D]` and k `[B, T, Hk, D]` by their positions, in fp32.

    Layout: rotate-half (NeoX, OLMo's: dims i and i + D/2 form a pair) or, with `interleaved`, GPT-J's
    (dims 2i and 2i + 1 form a pair); pair i turns by `position * theta^(-2i/D)` either way (frequencies changed
    by `scaling`, if given). `positions` is `[T]` or `[B, T]`; without it, positions run from `offset` (an int, or
    a `[B]` tensor).
    """
    if positions is None:
        positions = rope_positions(q.shape[1], offset, q.device)
    cos, sin = rope_cos_sin(positions, q.shape[-1], theta, _upcast(q[..., :0]).dtype, scaling)
    rotate_other = _rotate_half
    if interleaved:  # [c0..c_{D/2-1}, c0..] -> [c0, c0, c1, c1, ...]
        half = q.shape[-1] // 2
        cos, sin = (t[..., :half].repeat_interleave(2, dim=-1) for t in (cos, sin))
        rotate_other = _rotate_pairs
    if cos.dim() == 2:  # [T, D] -> [1, T, 1, D]
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    else:  # [B, T, D] -> [B, T, 1, D]
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]

    def rotate(t: torch.Tensor) -> torch.Tensor:
        t32 = _upcast(t)
        return (t32 * cos + rotate_other(t32) * sin).to(t.dtype)

    return rotate(q), rotate(k)


def clip_qkv(t: torch.Tensor, clip: float | None) -> torch.Tensor:
    """OLMo 1.7's `clip_qkv`, the one clamp rule of the package: `torch.clamp(t, -clip, clip)`, nothing if `clip` is
    None. Semantics are torch.clamp's: the bound is `clip` rounded to t's dtype (torch compares in the tensor's
    dtype: 0.3 clamps bf16 at 0.30078125), NaN stays NaN, and the gradient passes where -bound <= t <= bound
    (inclusive; not at NaN). The Triton kernels mirror it (`kernels/_clamp.py`: `clip_bound` rounds the bound the
    same way on the host, `clamp`/`clamp_grad` apply it on loaded tiles); tests/test_qkv_rope.py checks that they
    agree bitwise at the rounded bound, just past it and at NaN."""
    return t if clip is None else t.clamp(-clip, clip)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, clip_value: float | None = None,
              scale: float | None = None, window: int | None = None) -> torch.Tensor:
    """Softmax attention on `[B, T, H, D]` tensors (k/v may have fewer heads: GQA/MQA), q/k/v clamped first.

    With `causal` and fewer queries than keys, query i sees keys up to `Tk - Tq + i` (bottom-right aligned,
    as flash-attn and a KV cache need); with a `window` too, only the last `window` of them (itself included).
    """
    q, k, v = clip_qkv(q, clip_value), clip_qkv(k, clip_value), clip_qkv(v, clip_value)
    n_rep = q.shape[2] // k.shape[2]
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=2)
        v = v.repeat_interleave(n_rep, dim=2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    t_q, t_k = q.shape[2], k.shape[2]
    mask = None
    if causal and (t_q > 1 or window is not None):
        mask = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(diagonal=t_k - t_q)
        if window is not None:
            mask = mask.triu(diagonal=t_k - t_q - window + 1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens: torch.Tensor,
                     scale: float | None = None, window: int | None = None) -> torch.Tensor:
    """Attention of a few new queries `[B, Tq, H, D]` over a KV cache `[B, S, Hkv, D]`.

    Sequence b holds `seqlens[b]` valid keys (the Tq new ones included, written last); its query i sees keys
    `0 .. seqlens[b] - Tq + i` (with a `window`, only the last `window` of them). Slots past `seqlens[b]` are
    ignored, whatever they hold.
    """
    t_q, slots = q.shape[1], k_cache.shape[1]
    query_pos = seqlens.to(q.device).view(-1, 1) - t_q + torch.arange(t_q, device=q.device)  # [B, Tq]
    key_pos = torch.arange(slots, device=q.device).view(1, 1, -1)
    mask = key_pos <= query_pos[:, :, None]  # [B, Tq, S]
    if window is not None:
        mask &= key_pos > query_pos[:, :, None] - window
    n_rep = q.shape[2] // k_cache.shape[2]
    k = k_cache.repeat_interleave(n_rep, dim=2) if n_rep > 1 else k_cache
    v = v_cache.repeat_interleave(n_rep, dim=2) if n_rep > 1 else v_cache
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask[:, None], scale=scale)
    return out.transpose(1, 2)


def qkv_rope(qkv: torch.Tensor, n_heads: int, n_kv_heads: int, clip_value: float | None = None,
             positions: torch.Tensor | None = None, offset: int | torch.Tensor = 0, theta: float = 10000.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attention prologue: fused projection output `[B, T, (Hq + 2 Hkv) D]` -> clamp -> split -> RoPE.

    Returns q `[B, T, Hq, D]`, k and v `[B, T, Hkv, D]`.
    """
    B, T, width = qkv.shape
    head_dim = width // (n_heads + 2 * n_kv_heads)
    qkv = clip_qkv(qkv, clip_value)
    q, k, v = qkv.split((n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim), dim=-1)
    q, k = rope(q.view(B, T, n_heads, head_dim), k.view(B, T, n_kv_heads, head_dim), positions, offset, theta)
    return q, k, v.view(B, T, n_kv_heads, head_dim)


def qk_norm_rope(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, n_heads: int, n_kv_heads: int,
                 eps: float = 1e-6, positions: torch.Tensor | None = None, offset: int | torch.Tensor = 0,
                 theta: float = 10000.0, scaling: RopeScaling | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OLMo 2's attention prologue, as transformers' Olmo2Attention computes it: the fused projection output
    `[B, T, (Hq + 2 Hkv) D]` split into q | k | v, RMSNorm over all of q (`q_weight`, `[Hq D]`) and all of k
    (`k_weight`), each rounded to qkv's dtype, then RoPE on q and k. Returns q `[B, T, Hq, D]`, k and v
    `[B, T, Hkv, D]`."""
    B, T, width = qkv.shape
    head_dim = width // (n_heads + 2 * n_kv_heads)
    q, k, v = qkv.split((n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim), dim=-1)
    q, k = rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)
    q, k = rope(q.reshape(B, T, n_heads, head_dim), k.reshape(B, T, n_kv_heads, head_dim), positions, offset, theta,
                scaling=scaling)
    return q, k, v.reshape(B, T, n_kv_heads, head_dim)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean") -> torch.Tensor:
    """Token cross-entropy in fp32 over `[N, V]` logits and `[N]` labels."""
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction=reduction)


def z_loss_term(logits: torch.Tensor, labels: torch.Tensor, multiplier: float, ignore_index: int = -100,
                reduction: str = "mean") -> torch.Tensor:
    """OLMo-core's z-loss of `[N, V]` logits (in fp32, float64 kept): `multiplier * logsumexp(z)^2` per token whose
    label is not `ignore_index`, summed ("sum") or averaged over those tokens ("mean")."""
    valid = labels != ignore_index
    z_squared = torch.where(valid, torch.logsumexp(_upcast(logits), dim=-1).square(), 0.0).sum()
    return multiplier * (z_squared / valid.sum() if reduction == "mean" else z_squared)


def cross_entropy_chunk(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, compute_grad: bool,
                        z_loss: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The "cross_entropy_chunk" kernel's contract (kernels/linear_cross_entropy.py) in PyTorch: -> (per-row losses
    `[n]` fp32 of `logits [n, V]`: `lse - z[label] + z_loss * lse^2`, 0 where ignored; per-row `lse` `[n]` fp32, 0
    where ignored). With `compute_grad`, `logits` is overwritten in place by `softmax * (1 + 2 z_loss lse) -
    onehot(label)` (rows of ignored labels by 0)."""
    z = logits.float()  # the logits themselves when they are fp32
    lse = torch.logsumexp(z, dim=-1)
    valid = labels != ignore_index
    target = torch.where(valid, labels, 0)
    losses = torch.where(valid, lse - z.gather(1, target[:, None]).squeeze(1) + z_loss * lse * lse, 0.0)
    if compute_grad:
        z = z.sub_(lse[:, None]).exp_()
        if z_loss:
            z.mul_((1 + 2 * z_loss * lse)[:, None])
        z[torch.arange(z.shape[0], device=z.device), target] -= 1
        z.mul_(valid[:, None])
        if z is not logits:
            logits.copy_(z)
    return losses, torch.where(valid, lse, 0.0)
