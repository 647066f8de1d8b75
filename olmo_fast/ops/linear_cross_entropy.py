"""Fused linear + cross-entropy: the loss of `labels` under `softmax(x @ weight.T)` without ever holding the
`[tokens, vocab]` logits. One chunk loop for every backend; the per-chunk step is the "cross_entropy_chunk"
kernel ("triton", "cpp") or its PyTorch version `reference.cross_entropy_chunk` ("torch").

Scheme (Liger-Kernel's): gradients are computed in the forward, chunk by chunk. For each chunk of `chunk_size`
tokens: `z = x_c @ W.T` (`[chunk, V]`, x's dtype, as a plain lm_head would produce), the "cross_entropy_chunk"
kernel writes the per-token losses and turns `z` in place into `softmax(z) - onehot(y)`, then
`dx_c = z @ W` and `dW += z.T @ x_c` (an fp32 accumulator). The backward only scales the saved `dx`, `dW` by
the incoming gradient (and 1/n_valid for a mean), in place. One logits matmul instead of the two a
recomputing backward needs; what it costs is holding `dx` and `dW` from the forward to the backward, and a
second backward through the same graph (retain_graph) is refused by autograd's in-place check.

Memory beyond the inputs: one `[chunk, V]` logits block, `dx` `[N, D]` and `dW` `[V, D]` (fp32 while
accumulating; for half-precision weights each chunk adds a transient `[V, D]` product in that dtype) - the
gradients autograd would hold anyway. Only the gradients of inputs that require grad are computed; under
no_grad, only the losses.
"""
from __future__ import annotations

import torch

from . import reference
from ._library import kernel, nothing


def default_chunk_size(n_tokens: int, vocab: int, hidden: int) -> int:
    """Tokens per chunk so that a chunk's logits are about the size of x (Liger's rule), a power of two."""
    rows = max(1, -(-n_tokens // max(1, -(-vocab // hidden))))
    return 1 << (rows - 1).bit_length()


@torch.library.custom_op("olmo_fast::linear_cross_entropy_fwd", mutates_args=())
def _forward(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int, chunk_size: int,
             grad_x: bool, grad_w: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (summed loss fp32 [], dx [N, D] or [0], dW [V, D] or [0]) for the summed loss."""
    chunk_kernel = (reference.cross_entropy_chunk if backend == "torch"
                    else kernel("cross_entropy_chunk", backend, x))
    n_tokens = x.shape[0]
    compute_grad = grad_x or grad_w
    losses = torch.empty(n_tokens, dtype=torch.float32, device=x.device)
    dx = torch.empty_like(x) if grad_x else nothing(x)
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_w else nothing(weight)
    with torch.autocast(x.device.type, enabled=False):  # the matmuls run in x's dtype, whatever the context
        for start in range(0, n_tokens, chunk_size):
            end = min(start + chunk_size, n_tokens)
            x_c = x[start:end]
            logits = x_c @ weight.t()
            losses[start:end] = chunk_kernel(logits, labels[start:end], ignore_index, compute_grad)
            if grad_x:
                torch.mm(logits, weight, out=dx[start:end])
            if grad_w:
                if dw.dtype == logits.dtype:
                    dw.addmm_(logits.t(), x_c)
                else:
                    dw += logits.t() @ x_c
    return losses.sum(), dx, dw.to(weight.dtype) if grad_w else dw


@_forward.register_fake
def _(x, weight, labels, ignore_index, chunk_size, grad_x, grad_w, backend):
    return (x.new_empty((), dtype=torch.float32), torch.empty_like(x) if grad_x else nothing(x),
            torch.empty_like(weight) if grad_w else nothing(weight))


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1], output[2])


def _backward(ctx, d_loss, _dx, _dw):
    dx, dw = ctx.saved_tensors
    # in place: a [V, D] copy here would double the peak (the saved tensors are this op's own buffers)
    grad_x = dx.mul_(d_loss.to(dx.dtype)) if dx.numel() else None
    grad_w = dw.mul_(d_loss.to(dw.dtype)) if dw.numel() else None
    return grad_x, grad_w, None, None, None, None, None, None


_forward.register_autograd(_backward, setup_context=_setup_context)


def apply(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, ignore_index: int, reduction: str,
          chunk_size: int | None, backend: str) -> torch.Tensor:
    """The fused loss of `x [N, D]`, `weight [V, D]`, `labels [N]` (checked by `ops.linear_cross_entropy`)."""
    grad_on = torch.is_grad_enabled()
    chunk = chunk_size or default_chunk_size(x.shape[0], weight.shape[0], weight.shape[1])
    loss, _, _ = _forward(x, weight, labels, ignore_index, chunk, grad_on and x.requires_grad,
                          grad_on and weight.requires_grad, backend)
    if reduction == "mean":
        return loss / (labels != ignore_index).sum()
    return loss
