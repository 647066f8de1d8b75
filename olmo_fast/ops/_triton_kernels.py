"""Registers the Triton kernels of `olmo_fast.kernels` as the "triton" backend.

Each kernel module exports `KERNELS: dict[str, Callable]` (kernel name -> host launcher); they run on GPUs,
and on the CPU only under TRITON_INTERPRET=1 (the interpreter: for tests, never the default there).
"""
from __future__ import annotations

import importlib
import os

import triton  # noqa: F401  (ImportError here marks the backend unavailable, with the reason)

from .dispatch import register_kernel

KERNEL_MODULES = ("layer_norm", "swiglu", "rope", "attention_variants", "qkv_rope", "qk_norm_rope",
                  "decode_attention", "linear_cross_entropy")

_devices = ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)
for _name in KERNEL_MODULES:
    for _op, _fn in importlib.import_module(f"olmo_fast.kernels.{_name}").KERNELS.items():
        register_kernel(_op, "triton", _fn, _devices)
