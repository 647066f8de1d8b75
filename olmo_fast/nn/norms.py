"""Normalisation layers on `ops.layer_norm` / `ops.rms_norm`: fp32 statistics, output in the input's dtype,
and an optional fused residual add (`forward(x, residual)` returns `(norm(x + residual), x + residual)`)."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .base import OpModule


class LayerNorm(OpModule):
    """LayerNorm over the last dim. Non-parametric by default (OLMo's: no weight, no bias, eps 1e-5);
    `LayerNorm(C, elementwise_affine=True)` holds a weight (ones) and, with `bias`, a bias (zeros) like
    `torch.nn.LayerNorm`.
    """

    def __init__(self, normalized_shape: int | None = None, eps: float = 1e-5, elementwise_affine: bool = False,
                 bias: bool = True, backend: str | None = None) -> None:
        super().__init__(backend)
        if elementwise_affine and normalized_shape is None:
            raise ValueError("LayerNorm(elementwise_affine=True) needs normalized_shape (the last dim's size)")
        self.normalized_shape, self.eps = normalized_shape, eps
        self.weight = nn.Parameter(torch.ones(normalized_shape)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(normalized_shape)) if elementwise_affine and bias else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return ops.layer_norm(x, eps=self.eps, residual=residual, weight=self.weight, bias=self.bias,
                              backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, affine={self.weight is not None}, backend={self.backend}"


class RMSNorm(OpModule):
    """RMSNorm over the last dim: `x * rsqrt(mean(x^2) + eps) * weight` (Llama's, OLMo2's), weight ones."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, elementwise_affine: bool = True,
                 backend: str | None = None) -> None:
        super().__init__(backend)
        self.hidden_size, self.eps = hidden_size, eps
        self.weight = nn.Parameter(torch.ones(hidden_size)) if elementwise_affine else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return ops.rms_norm(x, self.weight, eps=self.eps, residual=residual, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, backend={self.backend}"


class RMSNormAdd(OpModule):
    """OLMo 2's post-norm residual (`ops.rms_norm_add`): `forward(x, residual)` = `residual + RMSNorm(x) * weight`
    (the norm in fp32, cast to x's dtype before the add), weight ones."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, backend: str | None = None) -> None:
        super().__init__(backend)
        self.hidden_size, self.eps = hidden_size, eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm_add(x, self.weight, residual, eps=self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, backend={self.backend}"
