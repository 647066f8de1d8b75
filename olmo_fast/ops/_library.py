"""Plumbing shared by the op modules' custom ops (the "triton" and "cpp" backends both run through them).

Each op is a pair of custom ops (`custom_op`), "olmo_fast::<op>_fwd" and "olmo_fast::<op>_bwd", with fake
(meta) implementations for torch.compile and autograd registered on the forward; both take `backend` and look
their kernel up with `kernel()`. Kernels see 2-D row views (`as_rows`) with unit column stride.

Why `custom_op` and not `torch.library.custom_op` alone: a call through the torch.library op costs about 8 us of
dispatch without autograd and 17 us with it (measured on a 2-core Xeon, torch 2.13: the dispatcher's boxed call
into Python, its autograd kernel, the generated autograd.Function and the schema's default-filling), more than a
small op's whole kernel. So in plain eager calls `custom_op` runs the same Python body directly, and under
autograd through a plain `torch.autograd.Function` made of the same body, setup_context and backward; anything
that traces or transforms (torch.compile, export, torch.fx, fake/meta tensors, dispatch and torch function modes,
functorch, tensor subclasses) gets the registered torch.library op, as before.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import dispatch

_Tensor, _Parameter = torch.Tensor, torch.nn.Parameter
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_functorch_active = torch._C._are_functorch_transforms_active
_has_torch_function = torch.overrides.has_torch_function


def _plain_eager(args: tuple) -> bool:
    """Whether a call on `args` is plain eager work: nothing traces (dynamo, a dispatch mode such as fake tensors
    or make_fx, a functorch transform, a torch function mode or argument such as torch.fx's Proxy) and every tensor
    argument is a plain tensor off the meta device."""
    if _is_compiling() or _dispatch_modes() or _functorch_active() or _has_torch_function(args):
        return False
    for a in args:
        kind = type(a)
        if kind is _Tensor or kind is _Parameter:
            if a.is_meta:
                return False
        elif isinstance(a, _Tensor):  # a subclass: FakeTensor, DTensor, ...
            return False
    return True


class CustomOp:
    """A `torch.library.custom_op` whose eager calls skip the dispatcher (module docstring). Decorate with
    `custom_op(name)`; register the fake with `.register_fake` and autograd with `.register_autograd`, as on
    torch's; `.op` is the torch.library op itself (what traced code calls)."""

    def __init__(self, name: str, fn: Callable) -> None:
        self.op = torch.library.custom_op(name, fn, mutates_args=())
        self._fn = fn
        self._apply: Callable | None = None  # the eager autograd.Function's apply, once autograd is registered
        self.__doc__, self.__name__ = fn.__doc__, fn.__name__

    def register_fake(self, fake: Callable) -> Callable:
        return self.op.register_fake(fake)

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        self.op.register_autograd(backward, setup_context=setup_context)
        fn = self._fn

        def forward(ctx, *args):  # the eager path's autograd: the op's body, then its setup_context
            output = fn(*args)
            setup_context(ctx, args, output)
            return output

        function = type(f"{self.__name__}_eager", (torch.autograd.Function,),
                        {"forward": staticmethod(forward), "backward": staticmethod(backward)})
        # autograd.Function.apply's C base: the Python classmethod on top of it only adds functorch handling
        # (which `_plain_eager` rules out) at 2 us a call
        self._apply = super(torch.autograd.Function, function).apply

    def __call__(self, *args: Any) -> Any:
        if not _plain_eager(args):
            return self.op(*args)
        if self._apply is not None and torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return self._apply(*args)
        return self._fn(*args)


def custom_op(name: str) -> Callable[[Callable], CustomOp]:
    """`@custom_op("olmo_fast::name")` on a function without side effects on its inputs: a `CustomOp`."""
    return lambda fn: CustomOp(name, fn)


def kernel(name: str, backend: str, like: torch.Tensor) -> Callable:
    """The `backend` kernel `name` for tensors on `like`'s device."""
    return dispatch.kernel(name, backend, like.device.type)


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """`[..., C]` as a 2-D `[N, C]` view with unit column stride; copies only when the leading dims do not
    collapse to one row stride or the last dim is strided."""
    if t.dim() == 2 and t.stride(1) == 1:  # already rows (most calls: checked first, it is the cheap test)
        return t
    if t.dim() == 0:
        raise ValueError("expected a tensor with at least one dimension")
    if t.stride(-1) != 1:
        t = t.contiguous()
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def from_rows(rows: torch.Tensor, like: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """A kernel's `[N, width]` output (`as_rows` of `like`) shaped as `like`'s `[..., width]` (width: like's
    last dim by default); as it is for a 2-D `like`, where the view would cost about 1 us (a small CPU call's
    whole kernel)."""
    if like.dim() == 2:
        return rows
    return rows.view(*like.shape[:-1], like.shape[-1] if width is None else width)


def check_like(name: str, t: torch.Tensor | None, ref: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> None:
    """Raise a clear error unless `t` (when given) has `shape` and sits on `ref`'s device."""
    if t is not None and (tuple(t.shape) != tuple(shape) or t.device != ref.device):
        raise ValueError(f"{name} must have shape {tuple(shape)} on {ref.device}, got {tuple(t.shape)} on {t.device}")


def check_positions(positions: torch.Tensor | None, batch: int, seq: int) -> None:
    """RoPE positions must be `[T]` or `[B, T]` integers."""
    if positions is not None and (positions.shape not in ((seq,), (batch, seq)) or positions.is_floating_point()):
        raise ValueError(f"positions must be integers of shape [T] or [B, T] = [{seq}] or [{batch}, {seq}], got "
                         f"{positions.dtype} {tuple(positions.shape)}")


def nothing(like: torch.Tensor) -> torch.Tensor:
    """Placeholder for an absent output (custom ops return tensors, never None)."""
    return like.new_empty(0)
