"""The SwiGLU ops `swiglu` (OLMo's fused `[x | gate]` layout) and `silu_mul` (separate gate and up tensors):
validation, dispatch, and the custom ops "olmo_fast::swiglu_fwd"/"_bwd" and "olmo_fast::silu_mul_fwd"/"_bwd"
with autograd, running the kernels of the same names (signatures: kernels/swiglu.py). The backward keeps the
inputs and recomputes the sigmoid.
"""
from __future__ import annotations

import torch

from . import dispatch, reference
from ._library import as_rows, custom_op, from_rows, kernel


def swiglu(h: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """`h = [x | gate]` (`[..., 2H]`) -> `silu(gate) * x` (`[..., H]`)."""
    if h.shape[-1] % 2:
        raise ValueError(f"swiglu needs an even last dim ([x | gate]), got {tuple(h.shape)}")
    chosen = dispatch.resolve("swiglu_fwd", backend, h.device)
    if chosen == "torch":
        return reference.swiglu(h)
    return _swiglu_fwd(h, chosen)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """The separate gate/up SwiGLU layout (Llama's MLP): `silu(gate) * up`, both `[..., H]`."""
    if gate.shape != up.shape:
        raise ValueError(f"silu_mul wants gate and up of one shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    chosen = dispatch.resolve("silu_mul_fwd", backend, gate.device)
    if chosen == "torch":
        return reference.silu_mul(gate, up)
    if gate.dtype != up.dtype or gate.device != up.device:  # the kernels' constraint ("torch" promotes)
        raise ValueError(f"silu_mul wants gate and up of one dtype and device, got {gate.dtype}/{gate.device} "
                         f"and {up.dtype}/{up.device}")
    return _silu_mul_fwd(gate, up, chosen)


def _out_shape(t: torch.Tensor, width: int) -> tuple[int, ...]:
    return (*t.shape[:-1], width)



@custom_op("olmo_fast::swiglu_fwd")
def _swiglu_fwd(h: torch.Tensor, backend: str) -> torch.Tensor:
    return from_rows(kernel("swiglu_fwd", backend, h)(as_rows(h)), h, h.shape[-1] // 2)


@_swiglu_fwd.register_fake
def _(h, backend):
    return h.new_empty(_out_shape(h, h.shape[-1] // 2))


@custom_op("olmo_fast::swiglu_bwd")
def _swiglu_bwd(dout: torch.Tensor, h: torch.Tensor, backend: str) -> torch.Tensor:
    return from_rows(kernel("swiglu_bwd", backend, h)(as_rows(dout), as_rows(h)), h)


@_swiglu_bwd.register_fake
def _(dout, h, backend):
    return h.new_empty(h.shape)


def _swiglu_setup(ctx, inputs, output) -> None:
    h, ctx.backend = inputs
    ctx.save_for_backward(h)


def _swiglu_backward(ctx, dout):
    (h,) = ctx.saved_tensors
    return _swiglu_bwd(dout, h, ctx.backend), None


_swiglu_fwd.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


@custom_op("olmo_fast::silu_mul_fwd")
def _silu_mul_fwd(gate: torch.Tensor, up: torch.Tensor, backend: str) -> torch.Tensor:
    return from_rows(kernel("silu_mul_fwd", backend, gate)(as_rows(gate), as_rows(up)), gate)


@_silu_mul_fwd.register_fake
def _(gate, up, backend):
    return gate.new_empty(gate.shape)


@custom_op("olmo_fast::silu_mul_bwd")
def _silu_mul_bwd(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, backend: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    d_gate, d_up = kernel("silu_mul_bwd", backend, gate)(as_rows(dout), as_rows(gate), as_rows(up))
    return from_rows(d_gate, gate), from_rows(d_up, up)


@_silu_mul_bwd.register_fake
def _(dout, gate, up, backend):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _silu_mul_setup(ctx, inputs, output) -> None:
    gate, up, ctx.backend = inputs
    ctx.save_for_backward(gate, up)


def _silu_mul_backward(ctx, dout):
    gate, up = ctx.saved_tensors
    d_gate, d_up = _silu_mul_bwd(dout, gate, up, ctx.backend)
    return d_gate, d_up, None


_silu_mul_fwd.register_autograd(_silu_mul_backward, setup_context=_silu_mul_setup)
