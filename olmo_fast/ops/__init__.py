"""Functional ops, each with `backend=None | "torch" | "triton" | "cpp"` (see `dispatch.py`).

`"torch"` runs `reference.py`. The Triton and compiled backends run through `ops/<op>.py`, whose `apply`
wraps the registered kernels in one torch.library custom op with autograd, shared by both backends.
"""
from __future__ import annotations

import importlib

import torch

from . import dispatch, reference
from .dispatch import BackendError, available_backends, prefer  # noqa: F401  (re-exported)

__all__ = ["layer_norm", "rms_norm", "swiglu", "silu_mul", "rope", "attention", "decode_attention", "qkv_rope",
           "linear_cross_entropy", "BackendError", "available_backends", "prefer"]


def _fused(op: str, fn: str = "apply"):
    return getattr(_OP_MODULES[op], fn)  # a dict lookup, so torch.compile traces through it (no import, no globals())


def _promote_residual(x: torch.Tensor, residual: torch.Tensor | None):
    """`x + residual` promotes as PyTorch does: under bf16 autocast the fp32 residual stream meets a bf16
    branch output, and the sum (and the norm's output) stays fp32 on every backend."""
    if residual is None or residual.dtype == x.dtype:
        return x, residual
    dtype = torch.promote_types(x.dtype, residual.dtype)
    return x.to(dtype), residual.to(dtype)


def layer_norm(x: torch.Tensor, *, eps: float = 1e-5, residual: torch.Tensor | None = None,
               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, backend: str | None = None):
    """LayerNorm over the last dim (fp32 statistics), output in x's dtype. OLMo's is non-parametric (no
    `weight`, no `bias`); other models pass `[C]` ones.

    With `residual`: `h = x + residual`, returns `(LN(h), h)` - the residual add every OLMo block does.
    """
    x, residual = _promote_residual(x, residual)
    parametric = weight is not None or bias is not None
    chosen = dispatch.resolve("norm_fwd" if parametric else "layer_norm_fwd", backend, x.device)
    if chosen == "torch":
        return reference.layer_norm(x, eps, residual, weight, bias)
    return _fused("layer_norm")(x, eps=eps, residual=residual, weight=weight, bias=bias, backend=chosen)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, *, eps: float = 1e-6,
             residual: torch.Tensor | None = None, backend: str | None = None):
    """RMSNorm over the last dim: `h * rsqrt(mean(h^2) + eps) * weight` with fp32 statistics (and an fp32
    weight gradient, reduced over rows in fp32), output in x's dtype. With `residual`, returns `(y, h)`."""
    x, residual = _promote_residual(x, residual)
    chosen = dispatch.resolve("norm_fwd", backend, x.device)
    if chosen == "torch":
        return reference.rms_norm(x, weight, eps, residual)
    return _fused("layer_norm")(x, eps=eps, residual=residual, weight=weight, rms=True, backend=chosen)


def swiglu(h: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """`h = [x | gate]` (`[..., 2H]`) -> `silu(gate) * x` (`[..., H]`)."""
    if h.shape[-1] % 2:
        raise ValueError(f"swiglu needs an even last dim ([x | gate]), got {tuple(h.shape)}")
    chosen = dispatch.resolve("swiglu_fwd", backend, h.device)
    if chosen == "torch":
        return reference.swiglu(h)
    return _fused("swiglu")(h, backend=chosen)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """The separate gate/up SwiGLU layout (Llama's MLP): `silu(gate) * up`, both `[..., H]`."""
    if gate.shape != up.shape:
        raise ValueError(f"silu_mul wants gate and up of one shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    chosen = dispatch.resolve("silu_mul_fwd", backend, gate.device)
    if chosen == "torch":
        return reference.silu_mul(gate, up)
    return _fused("swiglu", "apply_silu_mul")(gate, up, backend=chosen)


def rope(q: torch.Tensor, k: torch.Tensor, *, positions: torch.Tensor | None = None,
         offset: int | torch.Tensor = 0, theta: float = 10000.0, interleaved: bool = False,
         backend: str | None = None):
    """Rotary embedding (fp32) of q `[B, T, Hq, D]` and k `[B, T, Hk, D]` -> `(q, k)`, NeoX rotate-half layout
    (OLMo's) or, with `interleaved`, GPT-J's adjacent pairs.

    Positions are `positions` (`[T]` or `[B, T]`) or else `offset + arange(T)` (`offset` an int or `[B]`).
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape[-1] != k.shape[-1] or q.shape[:2] != k.shape[:2]:
        raise ValueError(f"rope wants q [B,T,Hq,D] and k [B,T,Hk,D], got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[-1] % 2:
        raise ValueError(f"rope needs an even head dim, got {q.shape[-1]}")
    chosen = dispatch.resolve("rope_interleaved" if interleaved else "rope", backend, q.device)
    if chosen == "torch":
        return reference.rope(q, k, positions, offset, theta, interleaved)
    return _fused("rope")(q, k, positions=positions, offset=offset, theta=theta, interleaved=interleaved,
                          backend=chosen)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
              clip: float | None = None, scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Softmax attention on `[B, T, H, D]` (flash-attn layout; k/v may have fewer heads), q/k/v clamped to
    `[-clip, clip]` first when `clip` is set. Causal masks align bottom-right when Tq < Tk (KV cache)."""
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention wants q [B,Tq,H,D], k and v [B,Tk,Hkv,D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} key/value heads")
    chosen = dispatch.resolve("attention_fwd", backend, q.device)
    if chosen == "torch":
        return reference.attention(q, k, v, causal, clip, scale)
    return _fused("attention")(q, k, v, causal=causal, clip=clip, scale=scale, backend=chosen)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens: torch.Tensor, *,
                     scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Decoding attention: new queries `[B, Tq, H, D]` over caches `[B, S, Hkv, D]` holding `seqlens[b]`
    valid keys each (the new tokens' keys already written at the end); causal within the new tokens."""
    if q.dim() != 4 or k_cache.shape != v_cache.shape or seqlens.shape != (q.shape[0],):
        raise ValueError(f"decode_attention wants q [B,Tq,H,D], caches [B,S,Hkv,D] and seqlens [B]; got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(seqlens.shape)}")
    chosen = dispatch.resolve("decode_attention", backend, q.device)
    if chosen == "torch":
        return reference.decode_attention(q, k_cache, v_cache, seqlens, scale)
    return dispatch.kernel("decode_attention", chosen, q.device.type)(q, k_cache, v_cache, seqlens, scale)


def qkv_rope(qkv: torch.Tensor, *, n_heads: int, n_kv_heads: int, clip: float | None = None,
             positions: torch.Tensor | None = None, offset: int | torch.Tensor = 0, theta: float = 10000.0,
             backend: str | None = None):
    """Attention prologue: `[B, T, (Hq + 2 Hkv) D]` -> clamp to ±clip -> split Q|K|V -> RoPE on q, k.

    Returns `(q, k, v)` in `[B, T, H, D]`.
    """
    if qkv.dim() != 3 or qkv.shape[-1] % (n_heads + 2 * n_kv_heads):
        raise ValueError(f"qkv_rope wants [B, T, (Hq + 2 Hkv) * D], got {tuple(qkv.shape)} "
                         f"for {n_heads} query and {n_kv_heads} key/value heads")
    chosen = dispatch.resolve("qkv_rope_fwd", backend, qkv.device)
    if chosen == "torch":
        return reference.qkv_rope(qkv, n_heads, n_kv_heads, clip, positions, offset, theta)
    return _fused("qkv_rope")(qkv, n_heads=n_heads, n_kv_heads=n_kv_heads, clip=clip, positions=positions,
                              offset=offset, theta=theta, backend=chosen)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                         reduction: str = "mean", chunk_size: int | None = None, check_labels: bool = True,
                         backend: str | None = None) -> torch.Tensor:
    """`F.cross_entropy(x @ weight.T, labels)` (fp32 loss) without materialising the `[tokens, vocab]` logits:
    x `[..., D]`, weight `[V, D]`, labels `[...]` (`ignore_index` skipped); `reduction` "mean" (over the
    labelled tokens) or "sum". Computed `chunk_size` tokens at a time (default: chunks whose logits are about
    x's size), with the gradients computed chunk by chunk in the forward: see `ops/linear_cross_entropy.py`.
    `check_labels=False` skips the label range check (a host sync) for callers that validated the ids already.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1] or x.shape[:-1] != labels.shape:
        raise ValueError(f"linear_cross_entropy wants x [..., D], weight [V, D] and labels [...]; got "
                         f"{tuple(x.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}")
    if x.dtype != weight.dtype or labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"x and weight must share a float dtype and labels be integers; got {x.dtype}, "
                         f"{weight.dtype}, {labels.dtype}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    x, labels = x.reshape(-1, x.shape[-1]), labels.reshape(-1).long()
    if check_labels and not torch.compiler.is_compiling():  # a host sync: eager mode only (no graph break)
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= weight.shape[0]))
        if bool(bad.any()):
            raise ValueError(f"labels must lie in [0, {weight.shape[0]}) or equal ignore_index={ignore_index}")
    chosen = dispatch.resolve("cross_entropy_chunk", backend, x.device)  # "torch": reference.cross_entropy_chunk
    return _fused("linear_cross_entropy")(x, weight, labels, ignore_index=ignore_index, reduction=reduction,
                                          chunk_size=chunk_size, backend=chosen)


def _load_op_modules() -> dict:
    """Import ops/<op>.py (custom ops + autograd; they import no kernels) with the package. Importing a
    submodule rebinds the package attribute <op> to it: the public functions are put back."""
    public = {name: globals()[name] for name in __all__}
    modules = {op: importlib.import_module(f"{__name__}.{op}")
               for op in ("layer_norm", "swiglu", "rope", "qkv_rope", "attention", "linear_cross_entropy")}
    globals().update(public)
    return modules


_OP_MODULES = _load_op_modules()
