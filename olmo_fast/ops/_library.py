"""Plumbing shared by the op modules' custom ops (the "triton" and "cpp" backends both run through them).

Each op is a pair of `torch.library` custom ops, "olmo_fast::<op>_fwd" and "olmo_fast::<op>_bwd", with fake
(meta) implementations for torch.compile and autograd registered on the forward; both take `backend` and look
their kernel up with `kernel()`. Kernels see 2-D row views (`as_rows`) with unit column stride.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from . import dispatch


def kernel(name: str, backend: str, like: torch.Tensor) -> Callable:
    """The `backend` kernel `name` for tensors on `like`'s device."""
    return dispatch.kernel(name, backend, like.device.type)


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """`[..., C]` as a 2-D `[N, C]` view with unit column stride; copies only when the leading dims do not
    collapse to one row stride or the last dim is strided."""
    if t.dim() == 0:
        raise ValueError("expected a tensor with at least one dimension")
    if t.stride(-1) != 1:
        t = t.contiguous()
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


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
