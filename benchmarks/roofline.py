"""The least work each benchmarked op must do: the bytes it must move (memory-bound ops) or its FLOPs (attention).

Every provider of an op is scored against the same number, so GB/s and TFLOP/s compare like with like: a
provider that moves more (an extra pass, a saved input) simply shows a lower rate. Bytes count each tensor the
op's contract reads or writes once (`s` = bytes per element of the input dtype); the fp32 `rstd` a LayerNorm
forward saves for its backward is counted (4 bytes a row). The attention FLOPs follow FlashAttention's
convention: 4·B·Tq·Tk·H·D for QKᵀ and PV, halved when causal, the backward 2.5× the forward. The fused linear
cross-entropy is scored by its matmuls' FLOPs too.
"""
from __future__ import annotations

MODES = ("fwd", "bwd", "fwd+bwd")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _split(mode: str, fwd: float, bwd: float) -> float:
    _check_mode(mode)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def layer_norm_bytes(n: int, c: int, s: int, mode: str, residual: bool = False) -> int:
    """Non-parametric LayerNorm of `[n, c]`. fwd: read x (and residual), write y (and h = x + residual) and
    rstd. bwd: read dy, y, rstd (and dh), write dx (which is also the residual's gradient)."""
    fwd = (2 + 2 * residual) * n * c * s + 4 * n
    bwd = (3 + residual) * n * c * s + 4 * n
    return int(_split(mode, fwd, bwd))


def swiglu_bytes(n: int, h: int, s: int, mode: str) -> int:
    """`[n, 2h]` -> `[n, h]`. fwd: read [x | gate], write out. bwd: read dout and [x | gate], write [dx | dgate]."""
    return int(_split(mode, 3 * n * h * s, 5 * n * h * s))


def rope_bytes(b: int, t: int, hq: int, hk: int, d: int, s: int, mode: str) -> int:
    """q `[b, t, hq, d]` and k `[b, t, hk, d]` rotated: each read once and written once, either way
    (cos/sin come from the positions, negligible)."""
    elems = b * t * (hq + hk) * d
    return int(_split(mode, 2 * elems * s, 2 * elems * s))


def qkv_rope_bytes(b: int, t: int, hq: int, hk: int, d: int, s: int, mode: str, clip: bool = False) -> int:
    """Fused projection `[b, t, (hq + 2hk) d]` -> clamp -> split -> RoPE: read it once, write q, k, v once. The
    backward reads dq, dk, dv and writes dqkv; with a clip it also reads qkv (the clamp's gradient mask)."""
    elems = b * t * (hq + 2 * hk) * d
    return int(_split(mode, 2 * elems * s, (2 + clip) * elems * s))


def qk_norm_rope_bytes(b: int, t: int, hq: int, hk: int, d: int, s: int, mode: str) -> int:
    """OLMo 2's prologue: `[b, t, (hq + 2hk) d]` -> split -> RMSNorm of the q and k parts -> RoPE. fwd: read qkv
    and the weights, write q, k, v and the two fp32 rstd a row. bwd: read dq, dk, dv, the q and k parts of qkv
    (the saved input), the weights and rstd; write dqkv and the weight gradients."""
    rows, weights = b * t, (hq + hk) * d
    elems = rows * (hq + 2 * hk) * d
    fwd = 2 * elems * s + weights * s + 8 * rows
    bwd = (2 * elems + rows * weights) * s + 2 * weights * s + 8 * rows
    return int(_split(mode, fwd, bwd))


def decode_attention_bytes(b: int, tq: int, cached: int, hq: int, hk: int, d: int, s: int) -> int:
    """New queries `[b, tq, hq, d]` over `cached` valid keys per sequence: read K and V of the valid cache,
    read q, write the output."""
    return 2 * b * cached * hk * d * s + 2 * b * tq * hq * d * s


def attention_flops(b: int, tq: int, tk: int, h: int, d: int, mode: str, causal: bool = True) -> float:
    """FlashAttention's count: 4·b·tq·tk·h·d forward (halved for causal), backward 2.5× the forward."""
    fwd = 4 * b * tq * tk * h * d * (0.5 if causal else 1.0)
    return _split(mode, fwd, 2.5 * fwd)


def linear_cross_entropy_flops(n: int, d: int, v: int, mode: str) -> float:
    """`[n, d]` tokens against a `[v, d]` head: the logits matmul (2·n·v·d) alone without gradients; with them, the
    forward also computes dx and dW (3 matmuls), and the backward only scales those, so it has no mode "bwd"."""
    _check_mode(mode)
    if mode == "bwd":
        raise ValueError("linear_cross_entropy computes its gradients in the forward: it has no backward to time")
    return 2.0 * n * v * d * (1 if mode == "fwd" else 3)


def copy_bytes(nbytes: int) -> int:
    """A device-to-device copy of `nbytes` reads and writes each byte: the bandwidth ceiling's count."""
    return 2 * nbytes


def matmul_flops(m: int, n: int, k: int) -> int:
    """`[m, k] @ [k, n]`: a multiply and an add per term (the FLOP/s ceiling's count)."""
    return 2 * m * n * k


def work(op: str, p: dict, itemsize: int, mode: str) -> tuple[int | None, float | None]:
    """`(bytes, flops)` of one benchmark case (`p`: its parameters, see `cases.py`); the one the op is scored
    by is not None. Attention and the linear cross-entropy are compute-bound (FLOPs); the others memory-bound
    (bytes)."""
    s = itemsize
    if op == "layer_norm":
        return layer_norm_bytes(p["n"], p["c"], s, mode, p.get("residual", False)), None
    if op == "swiglu":
        return swiglu_bytes(p["n"], p["h"], s, mode), None
    if op == "rope":
        return rope_bytes(p["b"], p["t"], p["hq"], p["hk"], p["d"], s, mode), None
    if op == "qkv_rope":
        return qkv_rope_bytes(p["b"], p["t"], p["hq"], p["hk"], p["d"], s, mode, p.get("clip") is not None), None
    if op == "qk_norm_rope":
        return qk_norm_rope_bytes(p["b"], p["t"], p["hq"], p["hk"], p["d"], s, mode), None
    if op == "attention":
        return None, attention_flops(p["b"], p["t"], p["t"], p["hq"], p["d"], mode, p.get("causal", True))
    if op == "linear_cross_entropy":
        return None, linear_cross_entropy_flops(p["n"], p["d"], p["v"], mode)
    if op == "decode_attention":
        _check_mode(mode)
        if mode != "fwd":
            raise ValueError("decode_attention is inference-only: it has no backward")
        return decode_attention_bytes(p["b"], p["tq"], p["cached"], p["hq"], p["hk"], p["d"], s), None
    raise ValueError(f"no work formula for op {op!r}")


def rates(op: str, p: dict, itemsize: int, mode: str, seconds: float, ceilings: dict) -> dict:
    """One call's work (`work`) and its rates at `seconds` a call: GB/s or TFLOP/s, and their percentage of the
    copy bandwidth and matmul FLOP/s measured in the same run (`ceilings`: copy_gbps, matmul_tflops; a ceiling
    not measured gives None)."""
    nbytes, flops = work(op, p, itemsize, mode)
    gbps = None if nbytes is None else nbytes / seconds / 1e9
    tflops = None if flops is None else flops / seconds / 1e12
    bw, mm = ceilings.get("copy_gbps"), ceilings.get("matmul_tflops")
    return {"bytes": nbytes, "flops": flops, "gbps": gbps, "tflops": tflops,
            "pct_copy_bw": None if gbps is None or not bw else 100 * gbps / bw,
            "pct_matmul": None if tflops is None or not mm else 100 * tflops / mm}
