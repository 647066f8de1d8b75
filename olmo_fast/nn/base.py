"""The one owner of a backend: each `olmo_fast.nn` module that runs ops is an `OpModule` holding the backend its
ops run on (None: the best available per op and device); `set_backend` walks a model's modules and sets each."""
from __future__ import annotations

from torch import nn


class OpModule(nn.Module):
    """A module whose forward calls `olmo_fast.ops` with `backend=self.backend`."""

    def __init__(self, backend: str | None = None) -> None:
        super().__init__()
        self.backend = backend

    def extra_repr(self) -> str:
        return f"backend={self.backend}"


def set_backend(model: nn.Module, backend: str | None) -> nn.Module:
    """Run every `OpModule` in `model` (itself included) on `backend`; returns `model`."""
    for module in model.modules():
        if isinstance(module, OpModule):
            module.backend = backend
    return model
