"""Functional ops, each with `backend=None | "torch" | "triton" | "cpp"` (see `dispatch.py`).

Each op lives in one module, top to bottom: the public function (its input validation, once), dispatch, and the
torch.library custom ops with autograd that the compiled backends ("triton", "cpp") share; `"torch"` runs
`reference.py`. The modules are named for what they hold, not for an op, so that importing one never shadows the
function of the same name here:
  norms.py             layer_norm, rms_norm              activations.py     swiglu, silu_mul
  rotary.py            rope                              qkv_prologue.py    qkv_rope
  softmax_attention.py attention, decode_attention       cross_entropy.py   linear_cross_entropy
  norms.py             rms_norm_add (OLMo 2's post-norm)   qk_norm.py         qk_norm_rope (OLMo 2's prologue)
`clip_qkv` is the one clamp rule (OLMo 1.7's QKV clipping) of the reference, the kernels and the patched models.
"""
from __future__ import annotations

from . import dispatch, reference
from .activations import silu_mul, swiglu
from .cross_entropy import linear_cross_entropy
from .dispatch import BackendError, available_backends, prefer
from .norms import layer_norm, rms_norm, rms_norm_add
from .qk_norm import qk_norm_rope
from .qkv_prologue import qkv_rope
from .reference import clip_qkv
from .rotary import rope
from .softmax_attention import attention, decode_attention

__all__ = ["layer_norm", "rms_norm", "rms_norm_add", "swiglu", "silu_mul", "rope", "attention", "decode_attention",
           "qkv_rope", "qk_norm_rope",
           "linear_cross_entropy", "clip_qkv", "BackendError", "available_backends", "prefer", "dispatch",
           "reference"]
