"""The causal LM loss, one path for the model, the trainer, the evaluator and the patched transformers models:
`causal_lm_loss` (the LM head and cross-entropy, fused or through the logits), `CausalLMLoss` (the same with its
backend, as a module), and the fused linear + cross-entropy as a drop-in module (`LinearCrossEntropy`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from ..ops import reference
from ..ops.cross_entropy import checked_z_loss
from .base import OpModule

REDUCTIONS = ("mean", "sum")
# (logits or None, loss), or with return_z_loss (logits or None, loss, z_term)
LossOutput = tuple[torch.Tensor | None, torch.Tensor] | tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]


def next_token_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Labels aligned with the inputs (HF's convention) -> each position's target: `labels[..., t + 1]`, and
    `ignore_index` at the last position, which has none."""
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, reduction: str = "mean",
                   fused: bool = True, ignore_index: int = -100, check_labels: bool = True, z_loss: float = 0.0,
                   return_z_loss: bool = False, backend: str | None = None) -> LossOutput:
    """Cross-entropy of the LM head's logits `hidden @ weight.T` (hidden `[..., D]`, weight `[V, D]`) against
    `targets` `[...]` (`ignore_index` skipped; see `next_token_labels`), in fp32; `reduction` "mean" (over the
    scored tokens) or "sum". Returns `(logits, loss)`.

    `fused`: `ops.linear_cross_entropy` in the dtype the head's matmul would run in (autocast's, else the
    weight's), never holding the `[tokens, V]` logits: `logits` is None. Otherwise the logits `F.linear(hidden,
    weight)` are returned, and the loss is `F.cross_entropy` of them in fp32. `check_labels=False` skips the fused
    op's label range check (a host sync), for callers that checked the labels already.
    `z_loss`: OLMo-core's z-loss multiplier, `z_loss * logsumexp(logits)^2` per scored token added to the loss
    (same reduction; unfused: from the fp32 logits). `return_z_loss=True` returns `(logits, loss, z_term)`, z_term
    that part alone, detached (for logging; `loss` includes it).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if fused:
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        loss, z_term = ops.linear_cross_entropy(
            hidden.to(dtype), weight.to(dtype), targets, ignore_index=ignore_index, reduction=reduction,
            check_labels=check_labels, z_loss=z_loss, return_z_loss=True, backend=backend)
        return (None, loss, z_term) if return_z_loss else (None, loss)
    z_loss = checked_z_loss(z_loss)
    logits = F.linear(hidden, weight)
    flat, flat_targets = logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)
    loss = F.cross_entropy(flat, flat_targets, ignore_index=ignore_index, reduction=reduction)
    if not (z_loss or return_z_loss):
        return logits, loss
    z_term = reference.z_loss_term(flat, flat_targets, z_loss, ignore_index, reduction)
    loss = loss + z_term if z_loss else loss
    return (logits, loss, z_term.detach()) if return_z_loss else (logits, loss)


class CausalLMLoss(OpModule):
    """`forward(hidden, weight, labels, reduction=, fused=, check_labels=, z_loss=, return_z_loss=)` ->
    `(logits or None, loss)` (`+ (z_term,)` with `return_z_loss`): position t of `hidden` `[B, T, D]` scored
    against `labels[:, t + 1]` (labels aligned with the inputs, -100 ignored) by `causal_lm_loss` on this
    module's backend."""

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, reduction: str = "mean",
                fused: bool = True, check_labels: bool = True, z_loss: float = 0.0, return_z_loss: bool = False
                ) -> LossOutput:
        return causal_lm_loss(hidden, weight, next_token_labels(labels), reduction=reduction, fused=fused,
                              check_labels=check_labels, z_loss=z_loss, return_z_loss=return_z_loss,
                              backend=self.backend)


class LinearCrossEntropy(OpModule):
    """`forward(x, weight, labels)` = `cross_entropy(x @ weight.T, labels)` without the `[tokens, vocab]`
    logits: pass the LM head's weight (tied or not). x `[..., D]`, weight `[V, D]`, labels `[...]`."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", chunk_size: int | None = None,
                 backend: str | None = None) -> None:
        super().__init__(backend)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.ignore_index, self.reduction, self.chunk_size = ignore_index, reduction, chunk_size

    def forward(self, x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return ops.linear_cross_entropy(x, weight, labels, ignore_index=self.ignore_index, reduction=self.reduction,
                                        chunk_size=self.chunk_size, backend=self.backend)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction}, chunk_size={self.chunk_size}"
