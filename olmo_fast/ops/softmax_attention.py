"""The ops `attention` (clipped-QKV softmax attention, for training and prefill) and `decode_attention` (a few
new queries over a KV cache): validation, dispatch, and attention's custom ops with autograd.

`olmo_fast::attention_fwd` returns `(out, lse)`; its autograd saves the raw q, k, v (never clipped copies or a
clip mask: the kernels re-clamp on load and recompute the clamp's gradient) with out and lse, and its backward
calls `olmo_fast::attention_bwd`. Both look up the kernels "attention_fwd" / "attention_bwd" of the chosen
backend (kernel contract in kernels/attention.py). Fake implementations make them traceable by torch.compile.
`decode_attention` has no gradient: it calls the "decode_attention" kernel (kernels/decode_attention.py) itself.

Kernel variants (A/B): `attention(variant=...)`, else the environment variable OLMO_FAST_ATTENTION (read per call),
else DEFAULT_VARIANT, names one of ATTENTION_VARIANTS (kernels/attention_variants.py says what each runs). The
"torch" backend has one implementation and ignores the name after validating it.
"""
from __future__ import annotations

import math
import os

import torch

from . import dispatch, reference
from ._library import custom_op, kernel

ATTENTION_VARIANTS = ("fa2", "tma", "tma-atomic", "tma-persistent")
DEFAULT_VARIANT = "fa2"  # on every target until a GPU run shows another one faster (benchmarks/results/)
VARIANT_ENV = "OLMO_FAST_ATTENTION"


def attention_variant(variant: str | None = None) -> str:
    """`variant`, else $OLMO_FAST_ATTENTION, else DEFAULT_VARIANT; ValueError for an unknown name."""
    name = variant or os.environ.get(VARIANT_ENV) or DEFAULT_VARIANT
    if name not in ATTENTION_VARIANTS:
        source = "variant" if variant else VARIANT_ENV
        raise ValueError(f"{source}={name!r} is not an attention variant; choose one of "
                         f"{', '.join(ATTENTION_VARIANTS)}")
    return name


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
              clip: float | None = None, scale: float | None = None, window: int | None = None,
              backend: str | None = None, variant: str | None = None) -> torch.Tensor:
    """Softmax attention on `[B, T, H, D]` (flash-attn layout; k/v may have fewer heads), q/k/v clamped to
    `[-clip, clip]` first when `clip` is set (`reference.clip_qkv`). Causal masks align bottom-right when Tq < Tk
    (KV cache); a sliding `window` (causal only) keeps the last `window` keys of each query, itself included
    (query at position i sees key j iff i - window < j <= i). `variant` picks the kernel variant (module
    docstring)."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention wants q [B,Tq,H,D], k and v [B,Tk,Hkv,D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    _check_heads_and_dtypes(q, k, v)
    _check_window(window, causal)
    name = attention_variant(variant)
    chosen = dispatch.resolve("attention_fwd", backend, q.device)
    if chosen == "torch":
        return reference.attention(q, k, v, causal, clip, scale, window)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, _ = attention_fwd(q, k, v, bool(causal), None if clip is None else float(clip), scale, window, chosen, name)
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens: torch.Tensor, *,
                     scale: float | None = None, window: int | None = None, backend: str | None = None
                     ) -> torch.Tensor:
    """Decoding attention: new queries `[B, Tq, H, D]` over caches `[B, S, Hkv, D]` holding `seqlens[b]`
    valid keys each (the new tokens' keys already written at the end); causal within the new tokens, and with a
    sliding `window` each query sees only the last `window` keys (itself included).
    seqlens[b] must lie in [Tq, S] (not checked: that would synchronise with the device)."""
    if q.dim() != 4 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape or q.shape[0] != k_cache.shape[0] \
            or q.shape[3] != k_cache.shape[3] or seqlens.shape != (q.shape[0],):
        raise ValueError(f"decode_attention wants q [B,Tq,H,D], caches [B,S,Hkv,D] and seqlens [B]; got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}, {tuple(seqlens.shape)}")
    _check_heads_and_dtypes(q, k_cache, v_cache)
    if seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"seqlens must be int32 or int64, got {seqlens.dtype}")
    _check_window(window, True)
    chosen = dispatch.resolve("decode_attention", backend, q.device)
    if chosen == "torch":
        return reference.decode_attention(q, k_cache, v_cache, seqlens, scale, window)
    return kernel("decode_attention", chosen, q)(q, k_cache, v_cache, seqlens, scale, window)


def _check_window(window: int | None, causal: bool) -> None:
    if window is None:
        return
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int (keys per query) or None, got {window!r}")
    if not causal:
        raise ValueError("a sliding window needs causal attention")


def _check_heads_and_dtypes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} key/value heads")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"attention wants q, k, v of one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")


@custom_op("olmo_fast::attention_fwd")
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, clip: float | None, scale: float,
                  window: int | None, backend: str, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    return kernel("attention_fwd", backend, q)(q, k, v, causal, clip, scale, window, variant)


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, causal, clip, scale, window, backend, variant):
    B, Tq, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, Tq), dtype=torch.float32)


@custom_op("olmo_fast::attention_bwd")
def attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, causal: bool, clip: float | None, scale: float, window: int | None, backend: str,
                  variant: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return kernel("attention_bwd", backend, q)(dout, q, k, v, out, lse, causal, clip, scale, window, variant)


@attention_bwd.register_fake
def _attention_bwd_fake(dout, q, k, v, out, lse, causal, clip, scale, window, backend, variant):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, causal, clip, scale, window, backend, variant = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.clip, ctx.scale, ctx.window = causal, clip, scale, window
    ctx.backend, ctx.variant = backend, variant
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_bwd(dout, q, k, v, out, lse, ctx.causal, ctx.clip, ctx.scale, ctx.window, ctx.backend,
                               ctx.variant)
    return dq, dk, dv, None, None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)
