"""The op `linear_cross_entropy`, fused linear + cross-entropy: the loss of `labels` under `softmax(x @ weight.T)`
without ever holding the `[tokens, vocab]` logits. One chunk loop for every backend; the per-chunk step is the
"cross_entropy_chunk" kernel ("triton", "cpp") or its PyTorch version `reference.cross_entropy_chunk` ("torch").

Scheme (Liger-Kernel's): gradients are computed in the forward, chunk by chunk. For each chunk of `chunk_size`
tokens: `z = x_c @ W.T` (`[chunk, V]`, x's dtype, as a plain lm_head would produce), the "cross_entropy_chunk"
kernel writes the per-token losses and turns `z` in place into `softmax(z) - onehot(y)`, then
`dx_c = z @ W` and `dW += z.T @ x_c` (an fp32 accumulator). With `z_loss` (OLMo's z-loss, `z_loss * lse^2` per
scored token, lse = logsumexp(z)) the kernel adds that term to each token's loss and `2 z_loss lse softmax(z)` to
its gradient row, in the same pass. The backward only scales the saved `dx`, `dW` by
the incoming gradient (and 1/n_valid for a mean), in place. One logits matmul instead of the two a
recomputing backward needs; what it costs is holding `dx` and `dW` from the forward to the backward, and a
second backward through the same graph (retain_graph) is refused by autograd's in-place check.

Memory beyond the inputs: one `[chunk, V]` logits block, `dx` `[N, D]` and `dW` `[V, D]` (fp32 while
accumulating; for half-precision weights each chunk adds a transient `[V, D]` product in that dtype) - the
gradients autograd would hold anyway. Only the gradients of inputs that require grad are computed; under
no_grad, only the losses.
"""
from __future__ import annotations

import contextlib

import torch

from . import dispatch, reference
from ._library import custom_op, kernel, nothing


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                         reduction: str = "mean", chunk_size: int | None = None, check_labels: bool = True,
                         z_loss: float = 0.0, return_z_loss: bool = False, backend: str | None = None
                         ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`F.cross_entropy(x @ weight.T, labels)` (fp32 loss) without materialising the `[tokens, vocab]` logits:
    x `[..., D]`, weight `[V, D]`, labels `[...]` (`ignore_index` skipped); `reduction` "mean" (over the
    labelled tokens) or "sum". Computed `chunk_size` tokens at a time (default: chunks whose logits are about
    x's size), with the gradients computed chunk by chunk in the forward (module docstring).
    `check_labels=False` skips the label range check (a host sync) for callers that validated the ids already.

    `z_loss`: OLMo-core's z-loss multiplier; the loss gains `z_loss * logsumexp(logits)^2` per labelled token
    (under the same reduction). With `return_z_loss`, returns `(loss, z_term)`: z_term is that part alone,
    detached (for logging; `loss` already includes it).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    z_loss = checked_z_loss(z_loss)
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1] or x.shape[:-1] != labels.shape:
        raise ValueError(f"linear_cross_entropy wants x [..., D], weight [V, D] and labels [...]; got "
                         f"{tuple(x.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}")
    if x.dtype != weight.dtype or labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"x and weight must share a float dtype and labels be integers; got {x.dtype}, "
                         f"{weight.dtype}, {labels.dtype}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    x, labels = x.reshape(-1, x.shape[-1]), labels.reshape(-1).long()
    scored = labels != ignore_index
    if check_labels and labels.numel() and not torch.compiler.is_compiling():  # a host sync: eager mode only
        lowest, highest = torch.stack(torch.aminmax(labels.where(scored, 0))).tolist()
        if lowest < 0 or highest >= weight.shape[0]:
            raise ValueError(f"labels must lie in [0, {weight.shape[0]}) or equal ignore_index={ignore_index}")
    chosen = dispatch.resolve("cross_entropy_chunk", backend, x.device)  # "torch": reference.cross_entropy_chunk
    grad_on = torch.is_grad_enabled()
    chunk = chunk_size or default_chunk_size(x.shape[0], weight.shape[0], weight.shape[1])
    loss, _, _, z_term = _forward(x, weight, labels, ignore_index, chunk, z_loss,
                                  grad_on and x.requires_grad, grad_on and weight.requires_grad, chosen)
    if reduction == "mean":
        n_scored = scored.sum()
        loss, z_term = loss / n_scored, z_term / n_scored
    return (loss, z_term) if return_z_loss else loss


def checked_z_loss(z_loss: float) -> float:
    """The z-loss multiplier as a float, or ValueError unless it is a finite number >= 0."""
    if isinstance(z_loss, bool) or not (isinstance(z_loss, (int, float)) and 0.0 <= z_loss < float("inf")):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    return float(z_loss)


# The least logits a default chunk holds (4 MiB in fp32): a chunk costs 4 op calls (the logits, the kernel, dx, dW)
# whatever its size, and below this their overhead outweighs the arithmetic (67 tokens over a 515-word vocabulary:
# 9 chunks of 8 tokens by Liger's rule alone, 5.6x slower than the unfused matmul + cross-entropy on a CPU).
MIN_CHUNK_LOGITS = 1 << 20


def default_chunk_size(n_tokens: int, vocab: int, hidden: int) -> int:
    """Tokens per chunk so that a chunk's logits are about the size of x (Liger's rule) but at least
    MIN_CHUNK_LOGITS, a power of two."""
    rows = max(1, -(-n_tokens // max(1, -(-vocab // hidden))), -(-MIN_CHUNK_LOGITS // max(1, vocab)))
    return 1 << (rows - 1).bit_length()


@custom_op("olmo_fast::linear_cross_entropy_fwd")
def _forward(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int, chunk_size: int,
             z_loss: float, grad_x: bool, grad_w: bool, backend: str
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (summed loss fp32 [] (z-loss included), dx [N, D] or [0], dW [V, D] or [0] for the summed loss,
    summed z-loss part fp32 [] (not differentiable))."""
    chunk_kernel = (reference.cross_entropy_chunk if backend == "torch"
                    else kernel("cross_entropy_chunk", backend, x))
    n_tokens = x.shape[0]
    compute_grad = grad_x or grad_w
    losses, lse = [], []  # per chunk, joined at the end (one chunk: no copy at all)
    dx = torch.empty_like(x) if grad_x else nothing(x)
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_w else nothing(weight)
    # the matmuls run in x's dtype, whatever the context (the context manager only where autocast is on)
    no_autocast = (torch.autocast(x.device.type, enabled=False) if torch.is_autocast_enabled(x.device.type)
                   else contextlib.nullcontext())
    with no_autocast:
        for start in range(0, n_tokens, chunk_size):
            end = min(start + chunk_size, n_tokens)
            x_c = x[start:end] if end - start < n_tokens else x
            logits = x_c @ weight.t()
            chunk_losses, chunk_lse = chunk_kernel(logits, labels[start:end], ignore_index, compute_grad, z_loss)
            losses.append(chunk_losses)
            lse.append(chunk_lse)
            if grad_x:
                torch.mm(logits, weight, out=dx[start:end])
            if grad_w:
                if dw.dtype == logits.dtype:
                    dw.addmm_(logits.t(), x_c)
                else:
                    dw += logits.t() @ x_c
    if not losses:  # no tokens
        losses = lse = [torch.zeros(0, dtype=torch.float32, device=x.device)]
    loss = (torch.cat(losses) if len(losses) > 1 else losses[0]).sum()
    lse = torch.cat(lse) if len(lse) > 1 else lse[0]
    z_term = z_loss * lse.square().sum() if z_loss else lse.new_zeros(())
    return loss, dx, dw.to(weight.dtype) if grad_w else dw, z_term


@_forward.register_fake
def _(x, weight, labels, ignore_index, chunk_size, z_loss, grad_x, grad_w, backend):
    scalar = x.new_empty((), dtype=torch.float32)
    return (scalar, torch.empty_like(x) if grad_x else nothing(x),
            torch.empty_like(weight) if grad_w else nothing(weight), scalar.new_empty(()))


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1], output[2])
    ctx.mark_non_differentiable(output[3])


def _backward(ctx, d_loss, _dx, _dw, _dz):
    dx, dw = ctx.saved_tensors
    # in place: a [V, D] copy here would double the peak (the saved tensors are this op's own buffers)
    grad_x = dx.mul_(d_loss.to(dx.dtype)) if dx.numel() else None
    grad_w = dw.mul_(d_loss.to(dw.dtype)) if dw.numel() else None
    return grad_x, grad_w, None, None, None, None, None, None, None


_forward.register_autograd(_backward, setup_context=_setup_context)
