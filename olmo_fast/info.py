"""`olmo-fast info`: versions, devices, and which backends and compiled extensions are usable (and why not)."""
from __future__ import annotations

import argparse
import json
import os
import platform

import torch

from .ops import dispatch


def build_info() -> dict:
    """What `pip install` built of the compiled extension olmo_fast._C, and why not (olmo_fast/_build_info.json)."""
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_info.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {"built": False, "reason": "no build record: install with `pip install --no-build-isolation -e .`"}


def _describe_extension(ext: dict) -> str:
    if not ext.get("built"):
        return ext.get("reason", "not built")
    kind = "CPU only" if ext.get("gpu", "none") == "none" else f"CPU + {ext['gpu'].upper()} ({ext.get('archs', '?')})"
    text = f"built: {kind}" + (f", in {ext['seconds']} s" if "seconds" in ext else "")
    return text + (f"; {ext['gpu_error']}" if "gpu_error" in ext else "")


def collect() -> dict:
    import olmo_fast

    info: dict = {
        "olmo_fast": olmo_fast.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_hip": getattr(torch.version, "hip", None),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or ["cpu"],
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as err:
        info["triton"] = f"not installed ({err})"
    info["extension"] = build_info()
    info["backends"] = dispatch.status()
    return info


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key == "extension":
            print(f"{key:>12}: olmo_fast._C {_describe_extension(value)}")
        elif key != "backends":
            print(f"{key:>12}: {value}")
    print("    backends:")
    for backend, entry in info["backends"].items():
        if "unavailable" in entry:
            print(f"      {backend:>7}: unavailable - {entry['unavailable']}")
        else:
            print(f"      {backend:>7}: {', '.join(entry['ops'])} on {', '.join(entry['devices'])}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="versions, devices and available backends",
                       description="Print versions, devices, and which kernel backends are available and why not.")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    p.set_defaults(run=run)
