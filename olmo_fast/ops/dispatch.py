"""The one dispatch point: which backend runs a kernel, and the table of compiled/Triton kernels.

Names: an *op* is a public function of `olmo_fast.ops` (`ops.rms_norm`); a *kernel* is a named plain function of
one backend, without autograd, that an op's custom op calls (e.g. "norm_fwd" and "norm_bwd", signatures in
`kernels/<file>.py`). Dispatch knows kernels only: providers register them, ops ask for them by name.

Backends:
  "torch"  - plain PyTorch (`reference.py`): the numerical reference, runs everywhere, registers no kernels.
  "triton" - Triton kernels from `kernels/` (CUDA/ROCm GPUs; the CPU only under TRITON_INTERPRET=1).
  "cpp"    - the compiled extension `olmo_fast._C`: CUDA or HIP kernels on a GPU, C++ loops on the CPU.

Kernel providers register functions with `register_kernel(name, backend, fn, devices)`, into one table keyed by
(kernel name, backend, device type): every later lookup is one dict access (a provider is imported on the first
lookup of its backend). An op call resolves its backend once, `resolve(<its forward kernel>, backend, device)`,
and passes the backend's name to its custom ops, which fetch their kernels with `kernel(...)`.
`backend=None` picks, per kernel and device, the first backend of `preferred_order(device)` that has it; the
environment variable OLMO_FAST_BACKEND (or, in-process, `with prefer(backend):`) puts its backend first, read
on every call (the preference is never memoized); kernels it lacks fall back to the others.
An explicit `backend=` is strict: if that backend has no such kernel on that device, it raises.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import traceback
from collections.abc import Callable, Iterator

import torch

BACKENDS = ("torch", "triton", "cpp")

# (kernel name, backend, device type) -> kernel: the registry, and the lookup table of every dispatch
_KERNELS: dict[tuple[str, str, str], Callable] = {}
# backend -> why it is (wholly or partly) unavailable: its provider's import error, with where it was raised
_UNAVAILABLE: dict[str, str] = {}
_PROVIDERS = {"triton": "olmo_fast.ops._triton_kernels", "cpp": "olmo_fast.ops._cpp_kernels"}
_loaded: set[str] = set()


class BackendError(RuntimeError):
    """An op was asked of a backend that cannot run it."""


def register_kernel(name: str, backend: str, fn: Callable, devices: tuple[str, ...] | frozenset[str]) -> None:
    """Make `fn` the `backend` kernel `name` on the given device types ("cuda", "cpu")."""
    if backend not in BACKENDS or backend == "torch":
        raise ValueError(f"kernels are registered for 'triton' or 'cpp', not {backend!r}")
    for device_type in devices:
        _KERNELS[(name, backend, device_type)] = fn


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


def _lookup(name: str, backend: str, device_type: str) -> Callable | None:
    """The table entry, or None; loads the backend's provider on its first miss."""
    fn = _KERNELS.get((name, backend, device_type))
    if fn is None and backend not in _loaded:
        _load_provider(backend)
        fn = _KERNELS.get((name, backend, device_type))
    return fn


def kernel(name: str, backend: str, device_type: str) -> Callable:
    """The registered `backend` kernel `name` on `device_type`, or BackendError saying why not."""
    fn = _lookup(name, backend, device_type)
    if fn is None:
        raise BackendError(_why_not(name, backend, device_type))
    return fn


def _why_not(name: str, backend: str, device_type: str) -> str:
    devices = sorted(d for (n, b, d) in _KERNELS if n == name and b == backend)
    if devices:
        return f"{name}: backend {backend!r} runs on {devices}, not on {device_type!r} tensors"
    why = _UNAVAILABLE.get(backend, f"the {backend!r} backend has no kernel {name!r}")
    return f"{name}: backend {backend!r} is unavailable ({why})"


def has_kernel(name: str, backend: str, device_type: str) -> bool:
    """Whether `backend` can run kernel `name` on `device_type` ("torch" runs everything)."""
    return backend == "torch" or _lookup(name, backend, device_type) is not None


def available_backends(name: str, device_type: str) -> list[str]:
    """Backends that can run kernel `name` on `device_type` now, best first."""
    return [b for b in _default_order(device_type) if has_kernel(name, b, device_type)]


def _default_order(device_type: str) -> list[str]:
    # Triton only leads on GPUs: under TRITON_INTERPRET on the CPU it is a (slow) test vehicle.
    return ["triton", "cpp", "torch"] if device_type == "cuda" else ["cpp", "torch"]


_preferred: list[str] = []  # stack of `prefer(...)` contexts, innermost last


@contextlib.contextmanager
def prefer(backend: str) -> Iterator[None]:
    """Within the block, `backend=None` tries `backend` first for every op (falling back per op where it has
    no kernel), as OLMO_FAST_BACKEND does for the whole process. E.g. the model on the C++ kernels, which on a
    GPU cover the norms, SwiGLU and RoPE but not attention: `with ops.prefer("cpp"): model(ids)`."""
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


def resolve(name: str, backend: str | None, device: torch.device) -> str:
    """The backend that runs kernel `name` on `device`: `backend` itself (checked), or the best available."""
    if backend is not None:
        if backend not in BACKENDS:
            raise BackendError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        if backend != "torch" and _lookup(name, backend, device.type) is None:
            raise BackendError(_why_not(name, backend, device.type))
        return backend
    for candidate in preferred_order(device.type):
        if has_kernel(name, candidate, device.type):
            return candidate
    return "torch"


def status() -> dict[str, dict[str, list[str] | str]]:
    """For `olmo-fast info`: per backend, the kernels it provides ("ops": kernel names) and on which devices, or
    why it is absent; a backend whose provider failed part-way (some kernel modules registered, then an import
    error) has both, the error as "load_error"."""
    for backend in _PROVIDERS:
        _load_provider(backend)
    report: dict[str, dict[str, list[str] | str]] = {"torch": {"ops": ["all"], "devices": ["cpu", "cuda"]}}
    for backend in _PROVIDERS:
        entries = [(n, d) for (n, b, d) in _KERNELS if b == backend]
        if entries:
            report[backend] = {"ops": sorted({n for n, _ in entries}), "devices": sorted({d for _, d in entries})}
            if backend in _UNAVAILABLE:
                report[backend]["load_error"] = _UNAVAILABLE[backend]
        else:
            report[backend] = {"unavailable": _UNAVAILABLE.get(backend, "no kernels registered")}
    return report
