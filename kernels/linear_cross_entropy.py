"""Cross-entropy of one chunk of logits and its gradient, in place: the per-chunk kernel of the fused linear
cross-entropy (`olmo_fast/ops/cross_entropy.py` runs the matmuls around it).

For each row i of `logits [n, V]` (fp32/fp16/bf16, stride(-1) == 1, any row stride) with label y_i and
lse_i = logsumexp(z_i):
    loss[i] = lse_i - z_i[y_i] + z_loss * lse_i^2    (fp32; 0 where y_i == ignore_index; OLMo's z-loss term)
    lse[i]  = lse_i                                   (fp32; 0 where ignored: the z-loss part is z_loss * lse^2)
and with COMPUTE_GRAD the row is overwritten by the gradient of `sum_i loss[i]`:
    z_i <- softmax(z_i) * (1 + 2 z_loss lse_i) - onehot(y_i)     (0 where y_i == ignore_index)
(the caller scales the products of these rows: 1/n_valid for a mean, the incoming gradient). With z_loss = 0
the factor is exactly 1: the numbers are bit for bit those without a z-loss.
All math in fp32. One program per row, two passes over it: an online max / sum-of-exp pass, then the gradient
pass. Bytes moved: the logits are read twice and written once (read once without the gradient), plus n labels
and 2n fp32 (losses, lse).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import next_pow2, num_warps, to_dtype


@triton.jit
def _cross_entropy_chunk_kernel(logits_ptr, row_stride, labels_ptr, loss_ptr, lse_ptr, V, ignore_index, z_loss,
                                COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    label = tl.load(labels_ptr + row)
    ignored = label == ignore_index
    offs = tl.arange(0, BLOCK)

    # Lanes start at a large finite negative, not -inf: exp(-inf - -inf) would be NaN for masked lanes.
    m = tl.full([BLOCK], -3.0e38, tl.float32)  # per-lane running max
    s = tl.zeros([BLOCK], tl.float32)  # per-lane sum of exp(z - m)
    for start in range(0, V, BLOCK):
        cols = start + offs
        z = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, z)
        s = s * tl.exp(m - m_new) + tl.exp(z - m_new)
        m = m_new
    row_max = tl.max(m, axis=0)
    lse = row_max + tl.log(tl.sum(s * tl.exp(m - row_max), axis=0))

    target = tl.where(ignored, 0, label)
    z_target = tl.load(base + target).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, lse - z_target + z_loss * lse * lse))
    tl.store(lse_ptr + row, tl.where(ignored, 0.0, lse))

    if COMPUTE_GRAD:
        keep = tl.where(ignored, 0.0, 1.0)
        p_scale = 1.0 + 2.0 * z_loss * lse  # d(lse + z_loss lse^2)/dz = softmax(z) (1 + 2 z_loss lse)
        for start in range(0, V, BLOCK):
            cols = start + offs
            z = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
            grad = (tl.exp(z - lse) * p_scale - tl.where(cols == target, 1.0, 0.0)) * keep
            tl.store(base + cols, to_dtype(grad, logits_ptr.dtype.element_ty), mask=cols < V)


def cross_entropy_chunk(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, compute_grad: bool,
                        z_loss: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (per-row losses `[n]` fp32 of `logits [n, V]`, z-loss included; per-row logsumexp `[n]` fp32, 0 where
    ignored); with `compute_grad`, `logits` becomes its gradient."""
    n, vocab = logits.shape
    loss = torch.full((n,), float("nan"), dtype=torch.float32, device=logits.device)
    lse = torch.full((n,), float("nan"), dtype=torch.float32, device=logits.device)
    if n == 0:
        return loss, lse
    block = min(next_pow2(vocab), 4096)  # the row is looped over in blocks: any vocabulary size
    _cross_entropy_chunk_kernel[(n,)](logits, logits.stride(0), labels, loss, lse, vocab, ignore_index, float(z_loss),
                                      COMPUTE_GRAD=compute_grad, BLOCK=block, num_warps=num_warps(block))
    return loss, lse


KERNELS = {"cross_entropy_chunk": cross_entropy_chunk}
