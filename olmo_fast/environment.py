"""What this installation and machine have (what `olmo-fast info` shows): versions, devices, and which backends
and compiled extensions are usable (and why not), with the list of what did not load that this machine should
have (`problems`): a failed or stale install, Triton kernels that failed to import (dispatch falls back to other
backends, quietly at run time), an extension built CPU-only or for other GPU architectures.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform

import torch

from .build_info import build_info
from .ops import dispatch


def install_layout() -> dict:
    """Where olmo_fast, its kernels and its benchmarks import from (an editable install maps this checkout's
    kernels/ and benchmarks/ into the package; without one they do not import), and the installed version."""
    import olmo_fast

    layout: dict = {"olmo_fast": os.path.dirname(os.path.abspath(olmo_fast.__file__))}
    for name in ("kernels", "benchmarks"):
        spec = importlib.util.find_spec(f"olmo_fast.{name}")
        layout[name] = os.path.dirname(spec.origin) if spec is not None and spec.origin else None
    try:
        layout["distribution"] = importlib.metadata.version("olmo-fast")
    except importlib.metadata.PackageNotFoundError:
        layout["distribution"] = None
    return layout


def _cuda_archs(archs: str) -> tuple[set[str], bool]:
    """The "major.minor" entries of a TORCH_CUDA_ARCH_LIST, and whether one carries PTX (JIT for newer cards)."""
    entries = [a.strip() for a in archs.replace(",", ";").replace(" ", ";").split(";") if a.strip()]
    return {a.removesuffix("+PTX").rstrip("a") for a in entries}, any(a.endswith("+PTX") for a in entries)


def problems(info: dict) -> list[str]:
    """What did not load that this machine should have, one line each (empty: all is there)."""
    found = []
    layout, ext, backends = info["install"], info["extension"], info["backends"]
    root = os.path.dirname(layout["olmo_fast"])
    for name in ("kernels", "benchmarks"):
        where = layout[name]
        if where is None:
            found.append(f"olmo_fast.{name} does not import: the editable install is missing or failed "
                         f"(`pip install --no-build-isolation -e .` in {root})")
        elif os.path.commonpath([root, os.path.abspath(where)]) != root:
            found.append(f"olmo_fast.{name} imports from {where}, not from this checkout ({root}): a stale "
                         f"install; reinstall with `pip install --no-build-isolation -e .`")
    gpu_torch = "cuda" if info["torch_cuda"] else "hip" if info["torch_hip"] else None
    has_gpu = info["devices"] != ["cpu"]
    if gpu_torch and not has_gpu:
        found.append(f"torch is built for {gpu_torch.upper()} but sees no GPU")
    triton = backends.get("triton", {})
    if "unavailable" in triton and (has_gpu or importlib.util.find_spec("triton") is not None):
        found.append(f"the Triton kernels did not load (ops fall back to other backends): {triton['unavailable']}")
    elif "load_error" in triton:
        found.append(f"some Triton kernels did not load (their ops fall back): {triton['load_error']}")
    cpp = backends.get("cpp", {})
    if not ext.get("built"):
        found.append(f"the compiled extension olmo_fast._C is not built: {ext.get('reason', 'no reason recorded')}")
    elif "unavailable" in cpp:
        found.append(f"olmo_fast._C was built but does not load: {cpp['unavailable']}")
    elif gpu_torch and ext.get("gpu") != gpu_torch:
        why = ext.get("gpu_error", f"it was built with OLMO_FAST_GPU or a torch without {gpu_torch.upper()}")
        found.append(f"olmo_fast._C was built CPU-only although torch has {gpu_torch.upper()}: {why}")
    elif has_gpu and "cuda" not in cpp.get("devices", []):
        found.append("olmo_fast._C was built for the GPU but registers no GPU kernels (gpu_runtime() is 'none')")
    elif has_gpu and gpu_torch == "cuda" and info.get("capability"):
        archs, ptx = _cuda_archs(str(ext.get("archs", "")))
        if info["capability"] not in archs and not ptx:
            found.append(f"olmo_fast._C has CUDA code for {ext.get('archs')} but not for this card "
                         f"({info['capability']}): its kernels cannot launch here; rebuild with "
                         f"TORCH_CUDA_ARCH_LIST={info['capability']}")
    return found


def collect() -> dict:
    """Versions, devices, install layout, extension build record, backend status and `problems`, as JSON-able
    data."""
    import olmo_fast

    info: dict = {
        "olmo_fast": olmo_fast.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_hip": getattr(torch.version, "hip", None),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or ["cpu"],
        "capability": ".".join(map(str, torch.cuda.get_device_capability())) if torch.cuda.is_available() else None,
        "install": install_layout(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as err:
        info["triton"] = f"not installed ({err})"
    info["extension"] = build_info()
    info["backends"] = dispatch.status()
    info["problems"] = problems(info)
    return info
