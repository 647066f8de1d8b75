"""The ops `layer_norm` and `rms_norm` (+ fused residual add): validation, dispatch, and the custom ops
"olmo_fast::norm_fwd" / "olmo_fast::norm_bwd" with autograd that the compiled backends run through; and OLMo 2's
post-norm residual `rms_norm_add` (norm, then add).

OLMo's non-parametric LayerNorm runs the kernels "layer_norm_fwd"/"layer_norm_bwd" (which every compiled
backend provides) and keeps only its output y and rstd for the backward (in plain eager calls on the "cpp" backend
through the extension's ops "layer_norm"/"layer_norm_residual", whose autograd node is C++); with a weight or
bias, or RMSNorm, it runs "norm_fwd"/"norm_bwd" and keeps the input h (+ mean, rstd). `rms_norm_add` runs
"rms_norm_add_fwd" / "rms_norm_add_bwd" through the custom ops "olmo_fast::rms_norm_add_fwd/bwd", keeping x and
rstd; its residual's gradient is the incoming one itself. Signatures: kernels/layer_norm.py.
"""
from __future__ import annotations

import torch

from . import dispatch, reference
from ._library import _plain_eager, as_rows, check_like, custom_op, from_rows, kernel, nothing


def layer_norm(x: torch.Tensor, *, eps: float = 1e-5, residual: torch.Tensor | None = None,
               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, backend: str | None = None):
    """LayerNorm over the last dim (fp32 statistics), output in x's dtype. OLMo's is non-parametric (no
    `weight`, no `bias`); other models pass `[C]` ones.

    With `residual`: `h = x + residual`, returns `(LN(h), h)` - the residual add every OLMo block does.
    """
    x, residual = _checked(x, residual, weight, bias)
    parametric = weight is not None or bias is not None
    chosen = dispatch.resolve("norm_fwd" if parametric else "layer_norm_fwd", backend, x.device)
    if chosen == "torch":
        return reference.layer_norm(x, eps, residual, weight, bias)
    if chosen == "cpp" and not parametric and _plain_eager((x, residual)):
        return _cpp_layer_norm(x, eps, residual)
    return _norm(x, eps, residual, weight, bias, False, chosen)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, *, eps: float = 1e-6,
             residual: torch.Tensor | None = None, backend: str | None = None):
    """RMSNorm over the last dim: `h * rsqrt(mean(h^2) + eps) * weight` with fp32 statistics (and an fp32
    weight gradient, reduced over rows in fp32), output in x's dtype. With `residual`, returns `(y, h)`."""
    x, residual = _checked(x, residual, weight, None)
    chosen = dispatch.resolve("norm_fwd", backend, x.device)
    if chosen == "torch":
        return reference.rms_norm(x, weight, eps, residual)
    return _norm(x, eps, residual, weight, None, True, chosen)


def rms_norm_add(x: torch.Tensor, weight: torch.Tensor | None, residual: torch.Tensor, *, eps: float = 1e-6,
                 backend: str | None = None) -> torch.Tensor:
    """OLMo 2's post-norm residual, norm then add: `residual + RMSNorm(x) * weight`, the norm with fp32 statistics
    and weight product, rounded to x's dtype before the add (as transformers' Olmo2DecoderLayer)."""
    check_like("residual", residual, x, x.shape)
    check_like("weight", weight, x, x.shape[-1:])
    chosen = dispatch.resolve("rms_norm_add_fwd", backend, x.device)
    if chosen == "torch":
        return reference.rms_norm_add(x, weight, residual, eps)
    return _add_fwd(x, weight, residual, eps, chosen)[0]


def _checked(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
             bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The norms' inputs checked, and `x + residual` promoted as PyTorch does: under bf16 autocast the fp32
    residual stream meets a bf16 branch output, and the sum (and the norm's output) stays fp32 on every backend."""
    width = x.shape[-1]
    check_like("residual", residual, x, x.shape)
    check_like("weight", weight, x, (width,))
    check_like("bias", bias, x, (width,))
    if residual is None or residual.dtype == x.dtype:
        return x, residual
    dtype = torch.promote_types(x.dtype, residual.dtype)
    return x.to(dtype), residual.to(dtype)


def _norm(x: torch.Tensor, eps: float, residual: torch.Tensor | None, weight: torch.Tensor | None,
          bias: torch.Tensor | None, rms: bool, backend: str):
    """A norm on a compiled backend: y, or (y, h) with a residual."""
    y, h, _, _ = _fwd(x, residual, weight, bias, eps, rms, backend)
    return y if residual is None else (y, h)


def _cpp_layer_norm(x: torch.Tensor, eps: float, residual: torch.Tensor | None):
    """The non-parametric LayerNorm in a plain eager call on the "cpp" backend: the extension's whole op, whose
    autograd node is C++ (a Python one costs more than eager PyTorch's whole LayerNorm on small inputs: the numbers
    are in csrc/bindings.cpp). y, or (y, h)."""
    if residual is None:
        return kernel("layer_norm", "cpp", x)(x, eps)
    return kernel("layer_norm_residual", "cpp", x)(x, residual, eps)


def _parametric(weight: torch.Tensor | None, bias: torch.Tensor | None, rms: bool) -> bool:
    return weight is not None or bias is not None or rms


@custom_op("olmo_fast::norm_fwd")
def _fwd(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
         eps: float, rms: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (y, h or nothing, mean or nothing, rstd), y and h shaped as x, mean/rstd [N] fp32."""
    rows, res = as_rows(x), None if residual is None else as_rows(residual)
    if _parametric(weight, bias, rms):
        y, h, mean, rstd = kernel("norm_fwd", backend, x)(rows, res, weight, bias, eps, rms)
    else:
        (y, h, rstd), mean = kernel("layer_norm_fwd", backend, x)(rows, res, eps), None
    return (from_rows(y, x), nothing(x) if h is None else from_rows(h, x),
            nothing(rstd) if mean is None else mean, rstd)


@_fwd.register_fake
def _(x, residual, weight, bias, eps, rms, backend):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    stats = x.new_empty(rows, dtype=torch.float32)
    store_mean = not rms and (weight is not None or bias is not None)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            nothing(x) if residual is None else torch.empty_like(x, memory_format=torch.contiguous_format),
            stats.new_empty(rows) if store_mean else nothing(stats), stats)


@custom_op("olmo_fast::norm_bwd")
def _bwd(dy: torch.Tensor, saved: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor | None,
         rstd: torch.Tensor, dh: torch.Tensor | None, has_bias: bool, rms: bool, backend: str
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx shaped as dy, dweight or nothing, dbias or nothing) (weight grads in fp32)."""
    rows, saved_rows, dh_rows = as_rows(dy), as_rows(saved), None if dh is None else as_rows(dh)
    if _parametric(weight, None, rms) or has_bias:
        dx, dw, db = kernel("norm_bwd", backend, dy)(rows, saved_rows, weight, mean, rstd, dh_rows, has_bias, rms)
    else:
        dx, dw, db = kernel("layer_norm_bwd", backend, dy)(rows, saved_rows, rstd, dh_rows), None, None
    return from_rows(dx, dy), nothing(rstd) if dw is None else dw, nothing(rstd) if db is None else db


@_bwd.register_fake
def _(dy, saved, weight, mean, rstd, dh, has_bias, rms, backend):
    width = dy.shape[-1]
    return (torch.empty_like(dy, memory_format=torch.contiguous_format),
            nothing(rstd) if weight is None else rstd.new_empty(width),
            rstd.new_empty(width) if has_bias else nothing(rstd))


def _setup(ctx, inputs, output) -> None:
    x, residual, weight, bias, _, rms, backend = inputs
    y, h, mean, rstd = output
    from_input = weight is not None or bias is not None
    saved = (x if residual is None else h) if from_input else y
    ctx.save_for_backward(saved, weight, mean if from_input and not rms else None, rstd)
    ctx.has_residual, ctx.rms, ctx.backend = residual is not None, rms, backend
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dy, dh, _dmean, _drstd):
    saved, weight, mean, rstd = ctx.saved_tensors
    has_bias = ctx.bias_dtype is not None
    dx, dw, db = _bwd(dy, saved, weight, mean, rstd, dh if ctx.has_residual else None, has_bias, ctx.rms,
                      ctx.backend)
    dw = None if weight is None else dw.to(weight.dtype)
    db = db.to(ctx.bias_dtype) if has_bias else None
    return dx, dx if ctx.has_residual else None, dw, db, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup)


def _dense(weight: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels read the weight with unit stride."""
    return None if weight is None else weight.contiguous()


@custom_op("olmo_fast::rms_norm_add_fwd")
def _add_fwd(x: torch.Tensor, weight: torch.Tensor | None, residual: torch.Tensor, eps: float, backend: str
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out shaped as x, in the promoted dtype of x and residual; rstd [N] fp32)."""
    out, rstd = kernel("rms_norm_add_fwd", backend, x)(as_rows(x), _dense(weight), as_rows(residual), eps)
    return from_rows(out, x), rstd


@_add_fwd.register_fake
def _(x, weight, residual, eps, backend):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    out = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype))
    return out, x.new_empty(rows, dtype=torch.float32)


@custom_op("olmo_fast::rms_norm_add_bwd")
def _add_bwd(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor, backend: str
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dx shaped as x in x's dtype, dweight fp32 or nothing)."""
    dx, dw = kernel("rms_norm_add_bwd", backend, dout)(as_rows(dout), as_rows(x), _dense(weight), rstd)
    return from_rows(dx, x), nothing(rstd) if dw is None else dw


@_add_bwd.register_fake
def _(dout, x, weight, rstd, backend):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            nothing(rstd) if weight is None else rstd.new_empty(x.shape[-1]))


def _add_setup(ctx, inputs, output) -> None:
    x, weight, residual, _, backend = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.residual_dtype, ctx.backend = residual.dtype, backend


def _add_backward(ctx, dout, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _add_bwd(dout, x, weight, rstd, ctx.backend)
    return dx, None if weight is None else dw.to(weight.dtype), dout.to(ctx.residual_dtype), None, None


_add_fwd.register_autograd(_add_backward, setup_context=_add_setup)
