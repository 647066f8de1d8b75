"""The fused linear + cross-entropy loss as a module (see `ops.linear_cross_entropy`)."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops


class LinearCrossEntropy(nn.Module):
    """`forward(x, weight, labels)` = `cross_entropy(x @ weight.T, labels)` without the `[tokens, vocab]`
    logits: pass the LM head's weight (tied or not). x `[..., D]`, weight `[V, D]`, labels `[...]`."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", chunk_size: int | None = None,
                 backend: str | None = None) -> None:
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.ignore_index, self.reduction, self.chunk_size, self.backend = ignore_index, reduction, chunk_size, backend

    def forward(self, x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return ops.linear_cross_entropy(x, weight, labels, ignore_index=self.ignore_index, reduction=self.reduction,
                                        chunk_size=self.chunk_size, backend=self.backend)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction}, chunk_size={self.chunk_size}"
