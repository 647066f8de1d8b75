"""The CPU emulation of the CUDA/HIP kernels (csrc/emulation/emulated_gpu.h) as the tests use it: the `gpu`
fixture (the kernels of csrc/kernels/*.cu and the test kernels of csrc/tests/*.cu, compiled by the host C++
compiler for an emulated warp of 32 and of 64 into one shared library, once per session; registered in conftest.py)
and the ctypes plumbing to launch them through their C ABI (csrc/include/olmo_fast/kernels.h). A test file declares
the argument structs of its kernels with `struct`, field for field as kernels.h has them."""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
WARPS = [32, 64]

i64, f32, i32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p


def struct(name: str, fields: list[tuple[str, object]]) -> type:
    return type(name, (ctypes.Structure,), {"_fields_": fields})


@pytest.fixture(scope="session", params=WARPS, ids=lambda w: f"warp{w}")
def gpu(request, tmp_path_factory) -> ctypes.CDLL:
    """The kernels compiled for the emulated GPU with this warp size, as a shared library."""
    if CXX is None:
        pytest.skip("no host C++ compiler (g++/c++) to build the emulated kernels")
    warp = request.param
    build = tmp_path_factory.mktemp(f"emulated{warp}")
    flags = ["-x", "c++", "-std=c++17", "-O1", "-fPIC", "-pthread", "-Wall", "-Wextra", "-Werror",
             "-Wno-unknown-pragmas", "-DOLMO_FAST_EMULATION", f"-DOLMO_FAST_EMULATED_WARP_SIZE={warp}",
             f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc' / 'emulation'}"]
    sources = sorted((ROOT / "csrc" / "kernels").glob("*.cu")) + sorted((ROOT / "csrc" / "tests").glob("*.cu"))
    objects = [build / f"{s.stem}.o" for s in sources]
    compiles = [subprocess.Popen([CXX, *flags, "-c", str(s), "-o", str(o)], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for s, o in zip(sources, objects)]
    logs = [c.communicate(timeout=900)[0] for c in compiles]  # read as they run: a long log cannot fill the pipe
    errors = [log for c, log in zip(compiles, logs) if c.returncode != 0]
    assert not errors, "\n".join(errors)[-3000:]
    lib = build / "libolmo_fast_emulated.so"
    done = subprocess.run([CXX, "-shared", "-pthread", *map(str, objects), "-o", str(lib)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return ctypes.CDLL(str(lib))


def p(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def launch(gpu: ctypes.CDLL, name: str, args: ctypes.Structure) -> None:
    fn = getattr(gpu, f"olmo_fast_{name}_gpu")
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int
    assert fn(ctypes.addressof(args), None) == 0, f"{name}: launch failed"


def nan(*shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype)


