"""The one dispatch point: which backend runs an op, and the table of compiled/Triton kernels.

Backends:
  "torch"  - plain PyTorch (`reference.py`): the numerical reference, runs everywhere.
  "triton" - Triton kernels from `kernels/` (CUDA/ROCm GPUs; the CPU only under TRITON_INTERPRET=1).
  "cpp"    - the compiled extension `olmo_fast._C`: CUDA or HIP kernels on a GPU, C++ loops on the CPU.

Kernel providers register plain functions (no autograd) with `register_kernel(op, backend, fn, devices)`;
`ops/<op>.py` wraps them in one torch.library custom op + autograd shared by every compiled backend.
`backend=None` picks, per op and device, the first available of `preferred_order(device)`;
the environment variable OLMO_FAST_BACKEND (or, in-process, `with prefer(backend):`) puts its backend first;
ops it lacks fall back to the others.
An explicit `backend=` is strict: if that backend cannot run the op on that device, it raises.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import traceback
from typing import Callable, Iterator

import torch

BACKENDS = ("torch", "triton", "cpp")

# op name -> backend -> (kernel callable, device types it supports)
_KERNELS: dict[str, dict[str, tuple[Callable, frozenset[str]]]] = {}
# backend -> why it is (wholly or partly) unavailable: its provider's import error, with where it was raised
_UNAVAILABLE: dict[str, str] = {}
_PROVIDERS = {"triton": "olmo_fast.ops._triton_kernels", "cpp": "olmo_fast.ops._cpp_kernels"}
_loaded: set[str] = set()


class BackendError(RuntimeError):
    """An op was asked of a backend that cannot run it."""


def register_kernel(op: str, backend: str, fn: Callable, devices: tuple[str, ...] | frozenset[str]) -> None:
    """Make `fn` the `backend` kernel of `op` on the given device types ("cuda", "cpu")."""
    if backend not in BACKENDS or backend == "torch":
        raise ValueError(f"kernels are registered for 'triton' or 'cpp', not {backend!r}")
    _KERNELS.setdefault(op, {})[backend] = (fn, frozenset(devices))


def mark_unavailable(backend: str, reason: str) -> None:
    _UNAVAILABLE[backend] = reason


def _load_provider(backend: str) -> None:
    if backend in _loaded or backend not in _PROVIDERS:
        return
    _loaded.add(backend)
    try:
        importlib.import_module(_PROVIDERS[backend])
    except Exception as err:  # an absent Triton or extension must never break the package: fall back, say why
        frame = traceback.extract_tb(err.__traceback__)[-1]
        where = f"{os.path.basename(frame.filename)}:{frame.lineno}"
        mark_unavailable(backend, f"{type(err).__name__}: {err} (at {where})")


def kernel(op: str, backend: str, device_type: str) -> Callable:
    """The registered kernel of `op` for `backend` on `device_type`, or BackendError saying why not."""
    _load_provider(backend)
    entry = _KERNELS.get(op, {}).get(backend)
    if entry is None:
        why = _UNAVAILABLE.get(backend, f"the {backend!r} backend has no kernel for {op!r}")
        raise BackendError(f"{op}: backend {backend!r} is unavailable ({why})")
    fn, devices = entry
    if device_type not in devices:
        raise BackendError(f"{op}: backend {backend!r} runs on {sorted(devices)}, not on {device_type!r} tensors")
    return fn


def has_kernel(op: str, backend: str, device_type: str) -> bool:
    if backend == "torch":
        return True
    try:
        kernel(op, backend, device_type)
        return True
    except BackendError:
        return False


def available_backends(op: str, device_type: str) -> list[str]:
    """Backends that can run `op` on `device_type` now, best first."""
    return [b for b in _default_order(device_type) if has_kernel(op, b, device_type)]


def _default_order(device_type: str) -> list[str]:
    # Triton only leads on GPUs: under TRITON_INTERPRET on the CPU it is a (slow) test vehicle.
    return ["triton", "cpp", "torch"] if device_type == "cuda" else ["cpp", "torch"]


_preferred: list[str] = []  # stack of `prefer(...)` contexts, innermost last


@contextlib.contextmanager
def prefer(backend: str) -> Iterator[None]:
    """Within the block, `backend=None` tries `backend` first for every op (falling back per op where it has
    no kernel), as OLMO_FAST_BACKEND does for the whole process. E.g. the model on the C++ kernels, which
    cover the norms, SwiGLU and RoPE but not attention: `with ops.prefer("cpp"): model(ids)`."""
    if backend not in BACKENDS:
        raise BackendError(f"prefer() takes one of {BACKENDS}, got {backend!r}")
    _preferred.append(backend)
    try:
        yield
    finally:
        _preferred.pop()


def preferred_order(device_type: str) -> list[str]:
    order = _default_order(device_type)
    first = _preferred[-1] if _preferred else os.environ.get("OLMO_FAST_BACKEND", "").strip().lower()
    if first:
        if first not in BACKENDS:
            raise BackendError(f"OLMO_FAST_BACKEND={first!r} is not one of {BACKENDS}")
        order = [first] + [b for b in order if b != first]
    return order


def resolve(op: str, backend: str | None, device: torch.device) -> str:
    """The backend that runs `op` on `device`: `backend` itself (checked), or the best available."""
    if backend is not None:
        if backend not in BACKENDS:
            raise BackendError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        if backend != "torch":
            kernel(op, backend, device.type)  # raises with the reason
        return backend
    for candidate in preferred_order(device.type):
        if has_kernel(op, candidate, device.type):
            return candidate
    return "torch"


def status() -> dict[str, dict[str, list[str] | str]]:
    """For `olmo-fast info`: per backend, the ops it provides and on which devices, or why it is absent; a backend
    whose provider failed part-way (some kernel modules registered, then an import error) has both, the error as
    "load_error"."""
    for backend in _PROVIDERS:
        _load_provider(backend)
    report: dict[str, dict[str, list[str] | str]] = {"torch": {"ops": ["all"], "devices": ["cpu", "cuda"]}}
    for backend in _PROVIDERS:
        ops = sorted(op for op, table in _KERNELS.items() if backend in table)
        if ops:
            devices = sorted(set().union(*(_KERNELS[op][backend][1] for op in ops)))
            report[backend] = {"ops": ops, "devices": devices}
            if backend in _UNAVAILABLE:
                report[backend]["load_error"] = _UNAVAILABLE[backend]
        else:
            report[backend] = {"unavailable": _UNAVAILABLE.get(backend, "no kernels registered")}
    return report
