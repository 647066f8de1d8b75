"""How `pip install` builds the compiled extension `olmo_fast._C` (loaded by setup.py; not part of the package).

What is built follows the installed torch (override with OLMO_FAST_GPU=cuda|hip|none):
  CUDA torch -> nvcc compiles csrc/kernels/*.cu (no torch headers) for TORCH_CUDA_ARCH_LIST (default "8.0;9.0");
  ROCm torch -> hipcc compiles the same sources as HIP for PYTORCH_ROCM_ARCH (default "gfx90a");
  then the host compiler builds csrc/bindings.cpp (the one torch-including file) and the CPU loops csrc/cpu/*.cpp
  into olmo_fast/_C, linked with those objects. A CPU torch builds the CPU part only; OLMO_FAST_NO_EXT=1 builds
  nothing. A failed GPU build falls back to the CPU extension, and a failed build never fails the install: the
  outcome and the reason are written to olmo_fast/_build_info.json, which `olmo-fast info` shows.
"""
from __future__ import annotations

import copy
import glob
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFO_FILE = "_build_info.json"
# Extension fields that a GPU build extends and a CPU fallback restores.
_LINK_FIELDS = ("extra_objects", "library_dirs", "libraries", "define_macros", "extra_compile_args", "extra_link_args")


def _rel(*parts: str) -> str:
    return os.path.join("csrc", *parts)


def _write_info(info: dict, *dirs: str) -> None:
    for d in dict.fromkeys(dirs):
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, INFO_FILE), "w") as f:
            json.dump(info, f, indent=2)


def _warn(message: str) -> None:
    print(f"\n*** olmo-fast: {message}\n", file=sys.stderr, flush=True)


def cuda_gencode_flags(arch_list: str) -> list[str]:
    """nvcc -gencode flags for a TORCH_CUDA_ARCH_LIST such as "8.0;9.0" or "8.0 9.0a+PTX"."""
    flags = []
    for arch in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        arch = arch.strip()
        if not arch:
            continue
        ptx = arch.endswith("+PTX")
        num = arch.removesuffix("+PTX").replace(".", "")
        if not num[:2].isdigit():
            raise ValueError(f"unsupported entry {arch!r} in TORCH_CUDA_ARCH_LIST={arch_list!r} (use e.g. '8.0;9.0')")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def _gpu_plan(torch) -> str:
    """'cuda', 'hip' or 'none': what this machine's torch (or OLMO_FAST_GPU) asks for."""
    forced = os.environ.get("OLMO_FAST_GPU", "auto").strip().lower()
    if forced in ("cuda", "hip", "none"):
        return forced
    if forced != "auto":
        raise ValueError(f"OLMO_FAST_GPU={forced!r} is not one of auto, cuda, hip, none")
    if getattr(torch.version, "hip", None):
        return "hip"
    return "cuda" if torch.version.cuda else "none"


def _host_flags(torch) -> tuple[list[str], list[str]]:
    """Compile and link flags of the host part: -O3, and OpenMP where torch's at::parallel_for uses it.
    -fno-wrapv undoes the -fwrapv of Python's CFLAGS (which setuptools puts first): with wrapping signed
    arithmetic GCC 12 no longer vectorises the 16-lane sums of csrc/cpu/loops.h (measured: LayerNorm forward
    1.0 -> 0.24 ns per element, fp32, 1024 x 128, AVX-512)."""
    if sys.platform == "win32":
        return ["/O2", "/std:c++17"], []
    compile_args = ["-O3", "-fno-trapping-math", "-fno-wrapv", "-Wall"]
    link_args = []
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        compile_args.append("-fopenmp")
        link_args.append("-fopenmp")
    return compile_args, link_args


def _make_extension(torch, cpp_extension):
    compile_args, link_args = _host_flags(torch)
    sources = [_rel("bindings.cpp")] + sorted(glob.glob(_rel("cpu", "*.cpp"), root_dir=ROOT))
    return cpp_extension.CppExtension(
        "olmo_fast._C", sources, include_dirs=[os.path.join(ROOT, "csrc", "include")],
        extra_compile_args=compile_args, extra_link_args=link_args)


def _cuda_home(cpp_extension) -> str:
    """The CUDA toolkit to build with: the first candidate holding nvcc and the static CUDA runtime."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME,
                  os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None, "/usr/local/cuda"]
    for home in filter(None, candidates):
        runtime = glob.glob(os.path.join(home, "lib*", "libcudart_static.a"))
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and runtime:
            return home
    tried = [c for c in candidates if c]
    raise RuntimeError(f"no CUDA toolkit with nvcc and libcudart_static.a among {tried}; set CUDA_HOME")


def _compile_gpu_objects(gpu: str, out_dir: str, cpp_extension) -> tuple[list[str], dict]:
    """Compile every csrc/kernels/*.cu with nvcc or hipcc (no torch headers); returns (objects, link settings)."""
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "kernels", "*.cu")))
    include = os.path.join(ROOT, "csrc", "include")
    common = ["-O3", "-std=c++17", f"-I{include}", "-c"]
    if gpu == "cuda":
        home = _cuda_home(cpp_extension)
        compiler = os.path.join(home, "bin", "nvcc")
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0"
        flags = common + ["-Xcompiler", "-fPIC"] + cuda_gencode_flags(archs)
        link = {"library_dirs": [os.path.join(home, "lib64"), os.path.join(home, "lib")],
                "libraries": ["cudart_static", "rt", "dl", "pthread"], "defines": ["OLMO_FAST_WITH_GPU"]}
    else:
        home = cpp_extension.ROCM_HOME or os.environ.get("ROCM_HOME") or "/opt/rocm"
        compiler = os.path.join(home, "bin", "hipcc")
        if not os.path.exists(compiler):
            compiler = shutil.which("hipcc") or compiler
        archs = os.environ.get("PYTORCH_ROCM_ARCH") or "gfx90a"
        offload = [f"--offload-arch={a}" for a in archs.replace(",", ";").split(";") if a]
        flags = common + ["-x", "hip", "-fPIC"] + offload
        link = {"library_dirs": [os.path.join(home, "lib")], "libraries": ["amdhip64"],
                "defines": ["OLMO_FAST_WITH_GPU", "OLMO_FAST_WITH_HIP"]}
    os.makedirs(out_dir, exist_ok=True)
    objects = []
    for src in sources:
        obj = os.path.join(out_dir, os.path.basename(src) + ".o")
        result = subprocess.run([compiler, *flags, src, "-o", obj], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{os.path.basename(compiler)} failed on {os.path.basename(src)}: "
                               f"{(result.stderr or result.stdout).strip()[-1500:]}")
        objects.append(obj)
    link["archs"] = archs
    return objects, link


def _remove_stale_extension(package_dir: str) -> None:
    """Drop an in-tree olmo_fast/_C*.so of an earlier editable build, so that a skipped or failed build is
    what runs (and what the build record says), not old code."""
    for path in glob.glob(os.path.join(package_dir, "_C.*")):
        if path.endswith((".so", ".pyd")):
            os.remove(path)


def setup_kwargs() -> dict:
    """`ext_modules` and `cmdclass` for setup(), or nothing (with the reason recorded) when there is no build."""
    package_dir = os.path.join(ROOT, "olmo_fast")
    if os.environ.get("OLMO_FAST_NO_EXT", "") not in ("", "0"):
        _remove_stale_extension(package_dir)
        _write_info({"built": False, "gpu": "none", "reason": "not built: OLMO_FAST_NO_EXT is set"}, package_dir)
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as err:  # e.g. pip's build isolation hid torch
        reason = (f"not built: torch was not importable at build time ({err}); install with "
                  "`pip install --no-build-isolation -e .` after torch")
        _warn(reason)
        _write_info({"built": False, "gpu": "none", "reason": reason}, package_dir)
        return {}

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's BuildExtension, with the GPU objects compiled first and every failure caught."""

        def run(self) -> None:
            # setuptools clears `inplace` while building (then copies the result into the source tree)
            self.into_source = bool(self.inplace or getattr(self, "editable_mode", False))
            super().run()

        def build_extensions(self) -> None:
            start = time.time()
            info: dict = {"built": False, "gpu": "none", "torch": torch.__version__}
            out_dirs = [os.path.dirname(self.get_ext_fullpath("olmo_fast._C"))]
            if getattr(self, "into_source", False):
                out_dirs.append(package_dir)
                _remove_stale_extension(package_dir)
            (ext,) = self.extensions
            cpu_only = copy.deepcopy({k: getattr(ext, k) for k in _LINK_FIELDS})
            try:
                gpu = _gpu_plan(torch)
                if gpu != "none":
                    try:
                        objects, link = _compile_gpu_objects(gpu, os.path.join(self.build_temp, "gpu"), cpp_extension)
                        ext.extra_objects += objects
                        ext.library_dirs += link["library_dirs"]
                        ext.libraries += link["libraries"]
                        ext.define_macros += [(d, "1") for d in link["defines"]]
                        super().build_extensions()
                        info.update(built=True, gpu=gpu, archs=link["archs"])
                    except Exception as err:
                        info["gpu_error"] = f"{gpu} build failed: {type(err).__name__}: {err}"[-2000:]
                        _warn(f"{info['gpu_error']}\n    -> building the CPU extension only")
                        for key, value in cpu_only.items():
                            setattr(ext, key, copy.deepcopy(value))
                if not info["built"]:
                    super().build_extensions()
                    info["built"] = True
            except Exception as err:
                info["reason"] = f"not built: {type(err).__name__}: {err}"[-2000:]
                _warn(f"the compiled extension olmo_fast._C was not built ({info['reason']}); "
                      "olmo-fast works without it (the 'cpp' backend is unavailable)")
                self.extensions = []  # nothing to copy into the source tree or the wheel
            info["seconds"] = round(time.time() - start, 1)
            _write_info(info, *out_dirs)

    return {"ext_modules": [_make_extension(torch, cpp_extension)], "cmdclass": {"build_ext": BuildExtension}}
