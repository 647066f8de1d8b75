"""Registers the compiled extension `olmo_fast._C` (ops `torch.ops.olmo_fast_C.*`) as the "cpp" backend.

The extension holds C++ loops for the CPU and, when built against a CUDA or ROCm torch, CUDA/HIP kernels for
the GPU (csrc/). Those ops have the Triton kernels' signatures (kernels/<file>.py) and are registered as the kernels
themselves; fake (meta) implementations let torch.compile trace through them. Two are whole ops instead, the
non-parametric LayerNorm "layer_norm" and "layer_norm_residual" with their autograd node in C++, which ops/norms.py
calls in plain eager calls. If the extension is absent,
importing this module raises ImportError saying why (from the build record olmo_fast/_build_info.json), and
dispatch marks "cpp" unavailable with that reason.
"""
from __future__ import annotations

import torch

from ..build_info import build_info
from .dispatch import register_kernel

try:
    from olmo_fast import _C  # noqa: F401  (importing registers torch.ops.olmo_fast_C)
except ImportError as err:
    info = build_info()
    why = info.get("reason") or info.get("gpu_error") or "built, but it does not load"
    raise ImportError(f"olmo_fast._C is unavailable: {err} [{why}]") from err

_ops = torch.ops.olmo_fast_C
GPU_RUNTIME: str = _ops.gpu_runtime()  # "cuda", "hip" or "none"
DEVICES = ("cpu", "cuda") if GPU_RUNTIME != "none" else ("cpu",)


def _direct(name: str):
    """`torch.ops.olmo_fast_C.<name>` as the C++ callable behind the op packet: the packet's `__call__` only
    forwards to it, a Python frame (0.3 us) per kernel call that the small CPU ops notice."""
    packet = getattr(_ops, name)
    return getattr(packet, "_op", packet)  # (an attribute of the packet since torch 1.x; else the packet)


KERNELS = {name: _direct(name) for name in (
    "layer_norm", "layer_norm_residual", "layer_norm_fwd", "layer_norm_bwd", "norm_fwd", "norm_bwd",
    "rms_norm_add_fwd", "rms_norm_add_bwd", "swiglu_fwd", "swiglu_bwd", "silu_mul_fwd", "silu_mul_bwd", "rope",
    "rope_interleaved", "qkv_rope_fwd", "qkv_rope_bwd", "qk_norm_rope_fwd", "qk_norm_rope_bwd", "cross_entropy_chunk",
    "decode_attention")}
_attention_fwd_op, _attention_bwd_op = _direct("attention_fwd"), _direct("attention_bwd")


# The attention variants (ops/softmax_attention.py) name Triton kernel sets: the C++ backend has one attention,
# whatever the variant asked for.
def _attention_fwd(q, k, v, causal, clip, scale, window, variant):
    return _attention_fwd_op(q, k, v, causal, clip, scale, window)


def _attention_bwd(dout, q, k, v, out, lse, causal, clip, scale, window, variant):
    return _attention_bwd_op(dout, q, k, v, out, lse, causal, clip, scale, window)


KERNELS.update(attention_fwd=_attention_fwd, attention_bwd=_attention_bwd)
for _name, _fn in KERNELS.items():
    register_kernel(_name, "cpp", _fn, DEVICES)


# Fake implementations: output shapes/dtypes for torch.compile and meta tensors.
@torch.library.register_fake("olmo_fast_C::layer_norm")
def _(x, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("olmo_fast_C::layer_norm_residual")
def _(x, residual, eps):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


@torch.library.register_fake("olmo_fast_C::layer_norm_fwd")
def _(x, residual, eps):
    n, c = x.shape
    h = x.new_empty((n, c)) if residual is not None else None
    return x.new_empty((n, c)), h, x.new_empty((n,), dtype=torch.float32)


@torch.library.register_fake("olmo_fast_C::layer_norm_bwd")
def _(dy, y, rstd, dh):
    return dy.new_empty(dy.shape)


@torch.library.register_fake("olmo_fast_C::norm_fwd")
def _(x, residual, weight, bias, eps, rms):
    n, c = x.shape
    stats = x.new_empty((n,), dtype=torch.float32)
    h = x.new_empty((n, c)) if residual is not None else None
    mean = stats.new_empty((n,)) if not rms and (weight is not None or bias is not None) else None
    return x.new_empty((n, c)), h, mean, stats


@torch.library.register_fake("olmo_fast_C::norm_bwd")
def _(dy, saved, weight, mean, rstd, dh, has_bias, rms):
    c = dy.shape[1]
    return (dy.new_empty(dy.shape), rstd.new_empty((c,)) if weight is not None else None,
            rstd.new_empty((c,)) if has_bias else None)


@torch.library.register_fake("olmo_fast_C::rms_norm_add_fwd")
def _(x, weight, residual, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype)), x.new_empty((x.shape[0],),
                                                                                                 dtype=torch.float32)


@torch.library.register_fake("olmo_fast_C::rms_norm_add_bwd")
def _(dout, x, weight, rstd):
    return x.new_empty(x.shape), rstd.new_empty((x.shape[1],)) if weight is not None else None


@torch.library.register_fake("olmo_fast_C::swiglu_fwd")
def _(h):
    return h.new_empty((h.shape[0], h.shape[1] // 2))


@torch.library.register_fake("olmo_fast_C::swiglu_bwd")
def _(dout, h):
    return h.new_empty(h.shape)


@torch.library.register_fake("olmo_fast_C::silu_mul_fwd")
def _(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.register_fake("olmo_fast_C::silu_mul_bwd")
def _(dout, gate, up):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


@torch.library.register_fake("olmo_fast_C::rope")
def _(x, positions, offset, theta, inverse):
    return x.new_empty(x.shape)


@torch.library.register_fake("olmo_fast_C::rope_interleaved")
def _(x, positions, offset, theta, inverse):
    return x.new_empty(x.shape)


@torch.library.register_fake("olmo_fast_C::qkv_rope_fwd")
def _(qkv, n_heads, n_kv_heads, clip, positions, offset, theta):
    B, T, width = qkv.shape
    D = width // (n_heads + 2 * n_kv_heads)
    return qkv.new_empty((B, T, n_heads, D)), qkv.new_empty((B, T, n_kv_heads, D)), qkv.new_empty((B, T, n_kv_heads, D))


@torch.library.register_fake("olmo_fast_C::qkv_rope_bwd")
def _(dq, dk, dv, qkv, clip, positions, offset, theta):
    B, T, n_heads, D = dq.shape
    return dq.new_empty((B, T, (n_heads + 2 * dk.shape[2]) * D))


@torch.library.register_fake("olmo_fast_C::qk_norm_rope_fwd")
def _(qkv, q_weight, k_weight, n_heads, n_kv_heads, eps, positions, offset, inv_freq, attention_factor):
    B, T, width = qkv.shape
    D = width // (n_heads + 2 * n_kv_heads)
    kv = qkv.new_empty((B, T, n_kv_heads, D))
    return (qkv.new_empty((B, T, n_heads, D)), kv, kv.new_empty(kv.shape),
            qkv.new_empty((B * T, 2), dtype=torch.float32))


@torch.library.register_fake("olmo_fast_C::qk_norm_rope_bwd")
def _(dq, dk, dv, qkv, q_weight, k_weight, rstd, positions, offset, inv_freq, attention_factor):
    return qkv.new_empty(qkv.shape), rstd.new_empty(q_weight.shape), rstd.new_empty(k_weight.shape)


@torch.library.register_fake("olmo_fast_C::cross_entropy_chunk")
def _(logits, labels, ignore_index, compute_grad, z_loss=0.0):
    per_row = logits.new_empty((logits.shape[0],), dtype=torch.float32)
    return per_row, per_row.new_empty(per_row.shape)


@torch.library.register_fake("olmo_fast_C::decode_attention")
def _(q, k_cache, v_cache, seqlens, scale, window):
    return q.new_empty(q.shape)


@torch.library.register_fake("olmo_fast_C::attention_fwd")
def _(q, k, v, causal, clip, scale, window):
    B, Tq, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, Tq), dtype=torch.float32)


@torch.library.register_fake("olmo_fast_C::attention_bwd")
def _(dout, q, k, v, out, lse, causal, clip, scale, window):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
