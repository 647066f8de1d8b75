"""Clipped-QKV attention as torch.library custom ops with autograd, shared by the compiled backends.

`olmo_fast::attention_fwd` returns `(out, lse)`; its autograd saves the raw q, k, v (never clipped copies or a
clip mask: the kernels re-clamp on load and recompute the clamp's gradient) with out and lse, and its backward
calls `olmo_fast::attention_bwd`. Both look up the kernels "attention_fwd" / "attention_bwd" of the chosen
backend (kernel contract in kernels/attention.py). Fake implementations make them traceable by torch.compile.
"""
from __future__ import annotations

import math

import torch

from ._library import kernel


@torch.library.custom_op("olmo_fast::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, clip: float | None, scale: float,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return kernel("attention_fwd", backend, q)(q, k, v, causal, clip, scale)


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, causal, clip, scale, backend):
    B, Tq, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, Tq), dtype=torch.float32)


@torch.library.custom_op("olmo_fast::attention_bwd", mutates_args=())
def attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, causal: bool, clip: float | None, scale: float, backend: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return kernel("attention_bwd", backend, q)(dout, q, k, v, out, lse, causal, clip, scale)


@attention_bwd.register_fake
def _attention_bwd_fake(dout, q, k, v, out, lse, causal, clip, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, causal, clip, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.clip, ctx.scale, ctx.backend = causal, clip, scale, backend
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_bwd(dout, q, k, v, out, lse, ctx.causal, ctx.clip, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def apply(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, clip: float | None,
          scale: float | None, backend: str) -> torch.Tensor:
    """Attention of q `[B, Tq, H, D]` over k, v `[B, Tk, Hkv, D]` with q/k/v clamped to ±clip, on `backend`."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, _ = attention_fwd(q, k, v, bool(causal), None if clip is None else float(clip), scale, backend)
    return out
