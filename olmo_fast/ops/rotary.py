"""The op `rope`: rotary embedding of q and k - validation, dispatch, and the custom op "olmo_fast::rope" whose
backward is itself with the inverse rotation.

Kernels: "rope" (NeoX rotate-half) and "rope_interleaved" (GPT-J), signatures in kernels/rope.py; an offset
given per sequence (a `[B]` tensor) becomes `[B, T]` positions for them.
"""
from __future__ import annotations

import torch

from . import dispatch, reference
from ._library import check_positions, custom_op, kernel


def rope(q: torch.Tensor, k: torch.Tensor, *, positions: torch.Tensor | None = None,
         offset: int | torch.Tensor = 0, theta: float = 10000.0, interleaved: bool = False,
         backend: str | None = None):
    """Rotary embedding (fp32) of q `[B, T, Hq, D]` and k `[B, T, Hk, D]` -> `(q, k)`, NeoX rotate-half layout
    (OLMo's) or, with `interleaved`, GPT-J's adjacent pairs.

    Positions are `positions` (`[T]` or `[B, T]`) or else `offset + arange(T)` (`offset` an int or `[B]`).
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape[-1] != k.shape[-1] or q.shape[:2] != k.shape[:2]:
        raise ValueError(f"rope wants q [B,T,Hq,D] and k [B,T,Hk,D], got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[-1] % 2:
        raise ValueError(f"rope needs an even head dim, got {q.shape[-1]}")
    if k.device != q.device:
        raise ValueError(f"q and k must share a device, got {q.device} and {k.device}")
    check_positions(positions, q.shape[0], q.shape[1])
    chosen = dispatch.resolve("rope_interleaved" if interleaved else "rope", backend, q.device)
    if chosen == "torch":
        return reference.rope(q, k, positions, offset, theta, interleaved)
    if positions is None and isinstance(offset, torch.Tensor):
        positions, offset = reference.rope_positions(q.shape[1], offset, q.device), 0
    return _rope(q, k, positions, int(offset), float(theta), False, interleaved, chosen)


@custom_op("olmo_fast::rope")
def _rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor | None, offset: int, theta: float,
          inverse: bool, interleaved: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    fn = kernel("rope_interleaved" if interleaved else "rope", backend, q)
    return fn(q, positions, offset, theta, inverse), fn(k, positions, offset, theta, inverse)


@_rope.register_fake
def _(q, k, positions, offset, theta, inverse, interleaved, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _setup(ctx, inputs, output) -> None:
    _, _, positions, ctx.offset, ctx.theta, ctx.inverse, ctx.interleaved, ctx.backend = inputs
    ctx.save_for_backward(positions)


def _backward(ctx, dq, dk):
    (positions,) = ctx.saved_tensors
    dq, dk = _rope(dq, dk, positions, ctx.offset, ctx.theta, not ctx.inverse, ctx.interleaved, ctx.backend)
    return dq, dk, None, None, None, None, None, None


_rope.register_autograd(_backward, setup_context=_setup)
