"""The attention kernels by variant name: what "attention_fwd" / "attention_bwd" of the "triton" backend run.

Variants (chosen per call by `ops.attention(variant=...)` or the OLMO_FAST_ATTENTION environment variable; names
and the default in `olmo_fast/ops/softmax_attention.py`), each a (forward, backward) pair with the contract of
kernels/attention.py (sliding `window` included) plus the variant's name:
  "fa2": kernels/attention.py's forward (cp.async loads, wgmma on sm_90) and its deterministic three-kernel
         backward (delta, dK/dV, dQ). The default on every target.
  "tma": kernels/attention_tma.py's forward (tensor descriptors / TMA on sm_90, one-FMA softmax step, lazy
         rescaling, longest-first schedule; "fa2"'s forward where TMA is missing) and "fa2"'s backward, which
         takes any forward's (out, lse).
  "tma-atomic": "tma"'s forward and FlashAttention-2's backward: dQ summed in fp32 by the dK/dV pass with
         atomics (5 products per tile pair instead of 7), then scaled, clamp-gradded and cast by a small pass;
         not bitwise deterministic ("fa2" and "tma" are the deterministic mode).
  "tma-persistent": "tma"'s forward on a persistent grid (a few programs per SM walking the query blocks
         longest first; kernels/attention_tma.py) and "fa2"'s backward.
No memory traffic of its own.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from .attention import attention_bwd, attention_fwd
from .attention_tma import attention_fwd_tma

VARIANTS: dict[str, tuple[Callable, Callable]] = {
    "fa2": (attention_fwd, attention_bwd),
    "tma": (attention_fwd_tma, attention_bwd),
    "tma-atomic": (attention_fwd_tma, functools.partial(attention_bwd, atomic_dq=True)),
    "tma-persistent": (functools.partial(attention_fwd_tma, persistent=True), attention_bwd),
}


def _pair(variant: str) -> tuple[Callable, Callable]:
    if variant not in VARIANTS:
        raise ValueError(f"unknown attention variant {variant!r}; the triton kernels have {', '.join(VARIANTS)}")
    return VARIANTS[variant]


def variant_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, clip: float | None, scale: float,
                window: int | None, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _pair(variant)[0](q, k, v, causal, clip, scale, window)


def variant_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                lse: torch.Tensor, causal: bool, clip: float | None, scale: float, window: int | None, variant: str
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _pair(variant)[1](dout, q, k, v, out, lse, causal, clip, scale, window)


KERNELS = {"attention_fwd": variant_fwd, "attention_bwd": variant_bwd}
