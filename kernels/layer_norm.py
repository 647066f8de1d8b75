"""Row normalisation over the last dim: LayerNorm (OLMo's non-parametric one, or with weight/bias) and RMSNorm,
optionally fused with the residual add - before the norm (OLMo 1's pre-norm block: add, then norm) or after it
(OLMo 2's post-norm: norm, then add) - forward and backward. One kernel pair; features are constexpr flags.

Forward, per row of C elements: h = x (+ residual, rounded to x's dtype as PyTorch's add is), fp32 statistics,
y = (h - mean) * rstd (* w + b), rstd = 1/sqrt(var + eps); RMSNorm: mean = 0, var = mean(h^2).
Norm, then add (ADD_AFTER, "rms_norm_add_fwd"): h = x, out = residual + y with y rounded to x's dtype first
(OLMo 2's `residual + (w * (x * rstd)).to(x.dtype)`, in the promoted dtype of both); its backward is the norm's
with dy = dout (in x's dtype) and d residual = dout itself (no kernel work).
Backward, g = dy (* w), xhat = y (no weight/bias: the input is not kept alive) or (h - mean) * rstd recomputed
from the saved input: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ dh) (RMSNorm: no mean(g) term);
dw = sum over rows of dy * xhat, db = sum of dy, as fp32 per-program partial rows summed on the host.
Rows longer than MAX_FUSED (`_launch.py`) loop over chunks (SINGLE_PASS=False): chunked Welford statistics,
then a second read to normalise.
Bytes per element (E = element size): forward reads E (+E residual) and writes E (+E for h; none after the
norm); backward reads 2E (dy, y or h; +E dh) and writes E. Single-pass rows read each input once; looped rows
read them twice.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import num_warps, persistent_programs, row_block, to_dtype


@triton.jit
def _load_h(X, R, H, cols, mask, HAS_RESIDUAL: tl.constexpr, STORE_H: tl.constexpr):
    """fp32 h = x (+ residual, rounded to h's dtype), optionally storing h."""
    h = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h_out = to_dtype(h + tl.load(R + cols, mask=mask, other=0.0).to(tl.float32), H.dtype.element_ty)
        if STORE_H:
            tl.store(H + cols, h_out, mask=mask)
        h = h_out.to(tl.float32)
    return h


@triton.jit
def _normalize_store(Y, W, B, R, h, cols, mask, mean, rstd, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     ADD_AFTER: tl.constexpr, NORM_DTYPE: tl.constexpr):
    """Y = (h - mean) * rstd (* w + b); ADD_AFTER: Y = R + that, rounded to NORM_DTYPE (x's) before the add."""
    y = (h - mean) * rstd
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    if ADD_AFTER:
        y = to_dtype(y, NORM_DTYPE).to(tl.float32) + tl.load(R + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + cols, to_dtype(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_fwd_kernel(X, R, W, B, Y, H, MEAN, RSTD, stride_x, stride_r, C, eps,
                     HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     IS_RMS: tl.constexpr, STORE_MEAN: tl.constexpr, BLOCK: tl.constexpr, SINGLE_PASS: tl.constexpr,
                     ADD_AFTER: tl.constexpr):
    """HAS_RESIDUAL: h = x + R (stored to H) is normalised; ADD_AFTER: Y = R + norm(x) (no H)."""
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    R += row * stride_r
    Y += row * C
    H += row * C
    cols = tl.arange(0, BLOCK)
    if SINGLE_PASS:
        mask = cols < C
        h = _load_h(X, R, H, cols, mask, HAS_RESIDUAL, True)
        if IS_RMS:
            mean = 0.0
            var = tl.sum(h * h, axis=0) / C
        else:
            mean = tl.sum(h, axis=0) / C
            centered = tl.where(mask, h - mean, 0.0)
            var = tl.sum(centered * centered, axis=0) / C
    else:
        mean = tl.zeros([], dtype=tl.float32)
        m2 = tl.zeros([], dtype=tl.float32)
        for start in range(0, C, BLOCK):
            mask = start + cols < C
            h = _load_h(X + start, R + start, H + start, cols, mask, HAS_RESIDUAL, True)
            if IS_RMS:
                m2 += tl.sum(h * h, axis=0)
            else:  # Chan et al.'s pairwise update: (count, mean, M2) of the rows so far + this chunk's
                seen = start * 1.0  # fp32 (a Python float under the interpreter)
                count = tl.minimum(C - start, BLOCK).to(tl.float32)
                chunk_mean = tl.sum(h, axis=0) / count
                centered = tl.where(mask, h - chunk_mean, 0.0)
                delta = chunk_mean - mean
                mean += delta * (count / (seen + count))
                m2 += tl.sum(centered * centered, axis=0) + delta * delta * (seen * count / (seen + count))
        var = m2 / C
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(RSTD + row, rstd)
    if STORE_MEAN:
        tl.store(MEAN + row, mean)
    if SINGLE_PASS:
        _normalize_store(Y, W, B, R, h, cols, mask, mean, rstd, HAS_WEIGHT, HAS_BIAS, ADD_AFTER,
                         X.dtype.element_ty)
    else:
        for start in range(0, C, BLOCK):
            mask = start + cols < C
            h = _load_h(X + start, R + start, H + start, cols, mask, HAS_RESIDUAL, False)
            _normalize_store(Y + start, W + start, B + start, R + start, h, cols, mask, mean, rstd, HAS_WEIGHT,
                             HAS_BIAS, ADD_AFTER, X.dtype.element_ty)


@triton.jit
def _bwd_terms(DY, S, W, cols, mask, mean, rstd, FROM_INPUT: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """fp32 (dy, g = dy * w, xhat) of one chunk of a row."""
    dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.load(S + cols, mask=mask, other=0.0).to(tl.float32)
    if FROM_INPUT:
        xhat = tl.where(mask, (xhat - mean) * rstd, 0.0)
    g = dy
    if HAS_WEIGHT:
        g = dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    return dy, g, xhat


@triton.jit
def _store_dx(DX, DH, g, xhat, c_xhat, c_mean, rstd, cols, mask, HAS_DH: tl.constexpr):
    """dx = rstd * (g - xhat * mean(g * xhat) - mean(g)) (+ dh) of one chunk of a row."""
    dx = (g - xhat * c_xhat - c_mean) * rstd
    if HAS_DH:
        dx += tl.load(DH + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + cols, to_dtype(dx, DX.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(DY, S, W, MEAN, RSTD, DH, DX, DW, DB, stride_dy, stride_s, stride_dh, N, C,
                     FROM_INPUT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_DH: tl.constexpr, IS_RMS: tl.constexpr, BLOCK: tl.constexpr, SINGLE_PASS: tl.constexpr):
    """Rows pid, pid + P, ...; S is the saved output y, or the saved input h when FROM_INPUT. DW/DB are this
    program's fp32 partial rows (zeroed beforehand when not SINGLE_PASS)."""
    pid = tl.program_id(0).to(tl.int64)  # int64 rows: the loop variable takes the bounds' type
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    DW += pid * C
    DB += pid * C
    if SINGLE_PASS:
        dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for row in range(pid, N, programs):
        dy_row = DY + row * stride_dy
        s_row = S + row * stride_s
        dh_row = DH + row * stride_dh
        dx_row = DX + row * C
        rstd = tl.load(RSTD + row)
        mean = 0.0
        if FROM_INPUT and not IS_RMS:
            mean = tl.load(MEAN + row)
        if SINGLE_PASS:
            mask = cols < C
            dy, g, xhat = _bwd_terms(dy_row, s_row, W, cols, mask, mean, rstd, FROM_INPUT, HAS_WEIGHT)
            c_xhat = tl.sum(g * xhat, axis=0) / C
            c_mean = 0.0 if IS_RMS else tl.sum(g, axis=0) / C
        else:
            c_xhat = tl.zeros([], dtype=tl.float32)
            c_mean = tl.zeros([], dtype=tl.float32)
            for start in range(0, C, BLOCK):
                mask = start + cols < C
                dy, g, xhat = _bwd_terms(dy_row + start, s_row + start, W + start, cols, mask, mean, rstd,
                                         FROM_INPUT, HAS_WEIGHT)
                c_xhat += tl.sum(g * xhat, axis=0)
                c_mean += tl.sum(g, axis=0)
            c_xhat = c_xhat / C
            c_mean = 0.0 if IS_RMS else c_mean / C
        if SINGLE_PASS:  # the terms are still in registers
            _store_dx(dx_row, dh_row, g, xhat, c_xhat, c_mean, rstd, cols, mask, HAS_DH)
            dw_acc += dy * xhat
            db_acc += dy
        else:
            for start in range(0, C, BLOCK):
                mask = start + cols < C
                dy, g, xhat = _bwd_terms(dy_row + start, s_row + start, W + start, cols, mask, mean, rstd,
                                         FROM_INPUT, HAS_WEIGHT)
                _store_dx(dx_row + start, dh_row + start, g, xhat, c_xhat, c_mean, rstd, cols, mask, HAS_DH)
                if HAS_WEIGHT:
                    tl.store(DW + start + cols, tl.load(DW + start + cols, mask=mask) + dy * xhat, mask=mask)
                if HAS_BIAS:
                    tl.store(DB + start + cols, tl.load(DB + start + cols, mask=mask) + dy, mask=mask)
    if SINGLE_PASS:
        if HAS_WEIGHT:
            tl.store(DW + cols, dw_acc, mask=cols < C)
        if HAS_BIAS:
            tl.store(DB + cols, db_acc, mask=cols < C)


def norm_fwd(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
             bias: torch.Tensor | None, eps: float, rms: bool):
    """x, residual `[N, C]` (unit column stride) -> (y, h = x + residual or None, mean [N] fp32 or None
    (LayerNorm with weight/bias only: what the backward recomputes xhat from), rstd [N] fp32)."""
    N, C = x.shape
    y = torch.empty((N, C), dtype=x.dtype, device=x.device)
    h = None if residual is None else torch.empty((N, C), dtype=x.dtype, device=x.device)
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    store_mean = not rms and (weight is not None or bias is not None)
    mean = torch.empty(N, dtype=torch.float32, device=x.device) if store_mean else None
    _launch_fwd(x, residual, weight, bias, y, h, mean, rstd, eps, rms, add_after=False)
    return y, h, mean, rstd


def _launch_fwd(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
                bias: torch.Tensor | None, y: torch.Tensor, h: torch.Tensor | None, mean: torch.Tensor | None,
                rstd: torch.Tensor, eps: float, rms: bool, add_after: bool) -> None:
    """The forward kernel over the rows of x into the given outputs (residual added before the norm into h, or
    with `add_after` into y after it)."""
    N, C = x.shape
    if not N:
        return
    block, single = row_block(C)
    _norm_fwd_kernel[(N,)](
        x, x if residual is None else residual, x if weight is None else weight, x if bias is None else bias,
        y, y if h is None else h, rstd if mean is None else mean, rstd,
        x.stride(0), 0 if residual is None else residual.stride(0), C, eps,
        HAS_RESIDUAL=residual is not None and not add_after, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, IS_RMS=rms, STORE_MEAN=mean is not None, BLOCK=block, SINGLE_PASS=single,
        ADD_AFTER=add_after, num_warps=num_warps(block))


def norm_bwd(dy: torch.Tensor, saved: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor | None,
             rstd: torch.Tensor, dh: torch.Tensor | None, has_bias: bool, rms: bool):
    """-> (dx [N, C] in dy's dtype, dweight [C] fp32 or None, dbias [C] fp32 or None). `saved` is the forward's
    input h when it had a weight or bias (with `mean` for LayerNorm), else its output y."""
    return _launch_bwd(dy, saved, weight, mean, rstd, dh, has_bias, rms, from_input=weight is not None or has_bias)


def _launch_bwd(dy: torch.Tensor, saved: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor | None,
                rstd: torch.Tensor, dh: torch.Tensor | None, has_bias: bool, rms: bool, from_input: bool):
    """`norm_bwd` with xhat recomputed from the saved input h (`from_input`) or read from the saved output y."""
    N, C = dy.shape
    block, single = row_block(C)
    dx = torch.empty((N, C), dtype=dy.dtype, device=dy.device)
    programs = persistent_programs(N, dy.device) if from_input else max(N, 1)
    partial = torch.empty if single and N else torch.zeros  # no row: no program writes its partial sums
    dw = partial((programs, C), dtype=torch.float32, device=dy.device) if weight is not None else None
    db = partial((programs, C), dtype=torch.float32, device=dy.device) if has_bias else None
    if N:
        _norm_bwd_kernel[(programs,)](
            dy, saved, dy if weight is None else weight, rstd if mean is None else mean, rstd,
            dy if dh is None else dh, dx, dx if dw is None else dw, dx if db is None else db,
            dy.stride(0), saved.stride(0), 0 if dh is None else dh.stride(0), N, C,
            FROM_INPUT=from_input, HAS_WEIGHT=weight is not None, HAS_BIAS=has_bias, HAS_DH=dh is not None,
            IS_RMS=rms, BLOCK=block, SINGLE_PASS=single, num_warps=num_warps(block))
    return dx, None if dw is None else dw.sum(0), None if db is None else db.sum(0)


def layer_norm_fwd(x: torch.Tensor, residual: torch.Tensor | None, eps: float):
    """OLMo's non-parametric LayerNorm: -> (y, h or None, rstd [N] fp32)."""
    y, h, _, rstd = norm_fwd(x, residual, None, None, eps, rms=False)
    return y, h, rstd


def layer_norm_bwd(dy: torch.Tensor, y: torch.Tensor, rstd: torch.Tensor, dh: torch.Tensor | None) -> torch.Tensor:
    """dx = rstd * (dy - mean(dy) - y * mean(dy * y)) (+ dh), from the output and rstd alone."""
    return norm_bwd(dy, y, None, None, rstd, dh, has_bias=False, rms=False)[0]


def rms_norm_add_fwd(x: torch.Tensor, weight: torch.Tensor | None, residual: torch.Tensor, eps: float):
    """OLMo 2's post-norm residual, norm then add: x, residual `[N, C]` (unit column stride), weight `[C]` or None
    -> (out = residual + (weight * x * rstd).to(x.dtype) `[N, C]` in the promoted dtype of x and residual,
    rstd [N] fp32)."""
    N, C = x.shape
    out = torch.empty((N, C), dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    _launch_fwd(x, residual, weight, None, out, None, None, rstd, eps, rms=True, add_after=True)
    return out, rstd


def rms_norm_add_bwd(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor):
    """-> (dx [N, C] in x's dtype, dweight [C] fp32 or None): the RMSNorm backward from the saved input x, with
    dy = dout rounded to x's dtype (as autograd does through the cast). d residual is dout itself."""
    dy = dout if dout.dtype == x.dtype else dout.to(x.dtype)
    dx, dw, _ = _launch_bwd(dy, x, weight, None, rstd, None, has_bias=False, rms=True, from_input=True)
    return dx, dw


KERNELS = {"layer_norm_fwd": layer_norm_fwd, "layer_norm_bwd": layer_norm_bwd, "norm_fwd": norm_fwd,
           "norm_bwd": norm_bwd, "rms_norm_add_fwd": rms_norm_add_fwd, "rms_norm_add_bwd": rms_norm_add_bwd}
