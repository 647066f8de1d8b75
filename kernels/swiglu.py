"""SwiGLU: out = silu(gate) * up, forward and backward, one pass each, fp32 math.

Two layouts share the kernels: OLMo's fused `h = [up | gate]` (`[N, 2H]`, the two halves passed as strided
views of h) and the separate gate/up tensors of Llama-style MLPs. The backward recomputes the sigmoid:
d_up = dout * silu(g), d_gate = dout * up * s * (1 + g * (1 - s)), s = sigmoid(g), writing both halves of the
fused gradient in the same pass.
Bytes per output element (E = element size): forward reads 2E, writes E; backward reads 3E, writes 2E.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import next_pow2, num_warps, to_dtype

MAX_BLOCK = 4096  # columns per program; a row wider than that spans several programs (grid axis 1)


@triton.jit
def _silu_mul_fwd_kernel(G, U, OUT, stride_g, stride_u, H, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * up
    tl.store(OUT + row * H + cols, to_dtype(out, OUT.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_bwd_kernel(DOUT, G, U, DG, DU, stride_dout, stride_g, stride_u, stride_dg, stride_du, H,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    dout = tl.load(DOUT + row * stride_dout + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    d_up = dout * g * s
    d_gate = dout * up * s * (1.0 + g * (1.0 - s))
    tl.store(DU + row * stride_du + cols, to_dtype(d_up, DU.dtype.element_ty), mask=mask)
    tl.store(DG + row * stride_dg + cols, to_dtype(d_gate, DG.dtype.element_ty), mask=mask)


def _grid(rows: int, width: int) -> tuple[tuple[int, int], int]:
    block = min(next_pow2(max(width, 16)), MAX_BLOCK)
    return (rows, triton.cdiv(width, block)), block


def silu_mul_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up `[N, H]` (unit column stride) -> silu(gate) * up `[N, H]` contiguous."""
    N, H = gate.shape
    out = torch.empty((N, H), dtype=gate.dtype, device=gate.device)
    grid, block = _grid(N, H)
    if out.numel():
        _silu_mul_fwd_kernel[grid](gate, up, out, gate.stride(0), up.stride(0), H, BLOCK=block,
                                   num_warps=num_warps(block))
    return out


def _silu_mul_bwd_into(dout, gate, up, d_gate, d_up) -> None:
    N, H = gate.shape
    grid, block = _grid(N, H)
    if d_gate.numel():
        _silu_mul_bwd_kernel[grid](dout, gate, up, d_gate, d_up, dout.stride(0), gate.stride(0), up.stride(0),
                                   d_gate.stride(0), d_up.stride(0), H, BLOCK=block, num_warps=num_warps(block))


def silu_mul_bwd(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (d_gate, d_up), `[N, H]` each, contiguous."""
    d_gate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    d_up = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    _silu_mul_bwd_into(dout, gate, up, d_gate, d_up)
    return d_gate, d_up


def swiglu_fwd(h: torch.Tensor) -> torch.Tensor:
    """h = [up | gate] `[N, 2H]` -> silu(gate) * up `[N, H]`."""
    H = h.shape[1] // 2
    return silu_mul_fwd(h[:, H:], h[:, :H])


def swiglu_bwd(dout: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """-> dh = [d_up | d_gate] `[N, 2H]` contiguous, written in one pass."""
    H = h.shape[1] // 2
    dh = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    _silu_mul_bwd_into(dout, h[:, H:], h[:, :H], dh[:, H:], dh[:, :H])
    return dh


KERNELS = {"swiglu_fwd": swiglu_fwd, "swiglu_bwd": swiglu_bwd, "silu_mul_fwd": silu_mul_fwd,
           "silu_mul_bwd": silu_mul_bwd}
