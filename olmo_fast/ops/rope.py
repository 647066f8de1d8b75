"""RoPE of q and k as the custom op "olmo_fast::rope", whose backward is itself with the inverse rotation.

Kernels: "rope" (NeoX rotate-half) and "rope_interleaved" (GPT-J), signatures in kernels/rope.py; an offset
given per sequence (a `[B]` tensor) becomes `[B, T]` positions here.
"""
from __future__ import annotations

import torch

from . import reference
from ._library import check_positions, kernel


@torch.library.custom_op("olmo_fast::rope", mutates_args=())
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


def apply(q: torch.Tensor, k: torch.Tensor, *, positions: torch.Tensor | None = None,
          offset: int | torch.Tensor = 0, theta: float = 10000.0, interleaved: bool = False, backend: str):
    """`ops.rope` on a compiled backend -> (q, k) rotated, contiguous."""
    if k.device != q.device:
        raise ValueError(f"q and k must share a device, got {q.device} and {k.device}")
    if positions is None and isinstance(offset, torch.Tensor):
        positions, offset = reference.rope_positions(q.shape[1], offset, q.device), 0
    check_positions(positions, q.shape[0], q.shape[1])
    return _rope(q, k, positions, int(offset), float(theta), False, interleaved, backend)
