"""torch.compile(fullgraph=True) through the custom ops, on the CPU; and the Triton kernels compiled for GPUs.

What runs: dynamo traces an OLMo block (fused residual LayerNorm, qkv_rope, attention, SwiGLU) with
`fullgraph=True` (any graph break fails), AOTAutograd traces forward and backward through the ops' fake
implementations and registered autograd, and the compiled block's outputs and gradients equal eager's.
The "aot_eager" compiler backend runs that traced graph without generating C++ (inductor's CPU codegen would
spend the test budget compiling C++; the custom ops are opaque to it either way). `torch.library.opcheck`
checks each custom op's schema, fake implementation and autograd registration against the real kernels.
The interpreter runs kernels with Python semantics, lenient where the compiler is not (loop-carried types,
pointer arithmetic); `test_kernels_compile_for_gpus` compiles every kernel (all feature flags on, both
LayerNorm paths) to PTX for sm_90 (warp 32) and to an AMD code object for gfx90a (wave 64) with the launch
helpers' warp counts - no GPU needed, in a subprocess with TRITON_INTERPRET=0.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import DEVICE, require_kernel_where_registered

from olmo_fast import ModelConfig
from olmo_fast.model import OLMoBlock

BACKENDS = ["triton", "cpp"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_compiles_fullgraph_and_matches_eager(backend):
    for name in ("layer_norm_fwd", "qkv_rope_fwd", "swiglu_fwd", "attention_fwd"):
        require_kernel_where_registered(name, backend)
    torch._dynamo.reset()
    config = ModelConfig.preset("test", n_kv_heads=2, clip_qkv=0.5)
    block = OLMoBlock(config, 0, backend=backend).to(DEVICE)
    block.reset_parameters()
    x = torch.randn(2, 9, config.d_model, device=DEVICE)
    delta = torch.randn(2, 9, config.d_model, device=DEVICE)

    def run(fn):
        xs = x.clone().requires_grad_(), delta.clone().requires_grad_()
        out, mlp = fn(*xs)
        params = list(block.parameters())
        grads = torch.autograd.grad((out * mlp).sum(), [*xs, *params])
        return [out, mlp, *grads]

    eager = run(block)
    compiled = run(torch.compile(block, fullgraph=True, backend="aot_eager"))
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=0, atol=0)


def _opcheck_cases(backend):
    x = torch.randn(3, 10, device=DEVICE)
    w = torch.randn(10, device=DEVICE)
    qkv = torch.randn(1, 2, 4 * 8, device=DEVICE)
    pos = torch.tensor([3, 5], device=DEVICE)
    return {
        "layer_norm_fwd": (torch.ops.olmo_fast.norm_fwd, (x, x.clone(), None, None, 1e-5, False, backend)),
        "norm_fwd": (torch.ops.olmo_fast.norm_fwd, (x, None, w, w.clone(), 1e-5, False, backend)),
        "swiglu_fwd": (torch.ops.olmo_fast.swiglu_fwd, (x, backend)),
        "silu_mul_fwd": (torch.ops.olmo_fast.silu_mul_fwd, (x, x.clone(), backend)),
        "rope": (torch.ops.olmo_fast.rope, (qkv.view(1, 2, 4, 8), qkv.view(1, 2, 4, 8)[:, :, :1].clone(), pos, 0,
                                            10000.0, False, False, backend)),
        "qkv_rope_fwd": (torch.ops.olmo_fast.qkv_rope_fwd, (qkv, 2, 1, 0.5, None, 4, 10000.0, backend)),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel", ["layer_norm_fwd", "norm_fwd", "swiglu_fwd", "silu_mul_fwd", "rope", "qkv_rope_fwd"])
def test_opcheck(backend, kernel):
    require_kernel_where_registered(kernel, backend)
    op, args = _opcheck_cases(backend)[kernel]
    args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                                "test_aot_dispatch_dynamic"))


def test_launch_params_fit_both_vendors(monkeypatch):
    """num_warps * warp size stays within 1024 threads for NVIDIA (32) and AMD (64) at every block size."""
    from olmo_fast.kernels import _launch

    for warp in (32, 64):
        monkeypatch.setattr(_launch, "warp_size", lambda warp=warp: warp)
        for block in (2 ** k for k in range(4, 18)):
            warps = _launch.num_warps(block)
            assert 1 <= warps * warp <= 1024 and warps & (warps - 1) == 0, (warp, block, warps)


def test_kernels_compile_for_gpus():
    require_kernel_where_registered("layer_norm_fwd", "triton")
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # "0": conftest's setdefault leaves it off in the child
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["compiled", "20"], done.stdout


def _compile_for_gpus() -> None:
    """Compile each kernel for sm_90 and gfx90a (run as a script: the kernels must not be interpreted)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from olmo_fast.kernels import _launch, layer_norm, qkv_rope, rope, swiglu

    flags = dict(HAS_RESIDUAL=True, HAS_WEIGHT=True, HAS_BIAS=True, IS_RMS=False, STORE_MEAN=True, FROM_INPUT=True,
                 HAS_DH=True, HAS_POS=True, INVERSE=True, INTERLEAVED=True, CLIP=True, ADD_AFTER=False)
    add_after = dict(HAS_RESIDUAL=False, HAS_BIAS=False, IS_RMS=True, STORE_MEAN=False, ADD_AFTER=True)  # OLMo 2
    tile = dict(BLOCK_H=32, BLOCK_HALF=64)  # OLMo-7B: 32 heads of 128
    kernels = [  # (kernel, constexprs, integer args among the capitalised names (the rest are pointers))
        (layer_norm._norm_fwd_kernel, dict(BLOCK=4096, SINGLE_PASS=True), {"C"}),
        (layer_norm._norm_fwd_kernel, dict(BLOCK=16384, SINGLE_PASS=False), {"C"}),
        (layer_norm._norm_fwd_kernel, dict(BLOCK=4096, SINGLE_PASS=True, **add_after), {"C"}),
        (layer_norm._norm_bwd_kernel, dict(BLOCK=4096, SINGLE_PASS=True), {"N", "C"}),
        (layer_norm._norm_bwd_kernel, dict(BLOCK=16384, SINGLE_PASS=False), {"N", "C"}),
        (swiglu._silu_mul_fwd_kernel, dict(BLOCK=4096), {"H"}),
        (swiglu._silu_mul_bwd_kernel, dict(BLOCK=4096), {"H"}),
        (rope._rope_kernel, tile, {"T", "H", "HALF"}),
        (qkv_rope._qkv_rope_fwd_kernel, tile, {"T", "HQ", "HKV", "HALF"}),
        (qkv_rope._qkv_rope_bwd_kernel, tile, {"T", "HQ", "HKV", "HALF"}),
    ]
    fp32_pointers = {"MEAN", "RSTD", "INV_FREQ", "DW", "DB"}
    count = 0
    for fn, sizes, ints in kernels:
        constexprs = {name: value for name, value in {**flags, **sizes}.items() if name in fn.arg_names}
        signature = {}
        for name in fn.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name.isupper() and name not in ints:
                signature[name] = "*i64" if name == "POS" else "*fp32" if name in fp32_pointers else "*bf16"
            else:
                signature[name] = "fp32" if name in ("eps", "clip") else "i32"
        elements = 2 * sizes["BLOCK_H"] * sizes["BLOCK_HALF"] if "BLOCK_H" in sizes else sizes["BLOCK"]
        for target in (GPUTarget("cuda", 90, 32), GPUTarget("hip", "gfx90a", 64)):
            _launch.warp_size = lambda target=target: target.warp_size
            triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target,
                           options={"num_warps": _launch.num_warps(elements)})
            count += 1
    print("compiled", count)


if __name__ == "__main__":
    _compile_for_gpus()
