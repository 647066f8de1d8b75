"""torch.compile(fullgraph=True) through the custom ops, on the CPU.

What runs: dynamo traces an OLMo block (fused residual LayerNorm, qkv_rope, attention, SwiGLU) with
`fullgraph=True` (any graph break fails), AOTAutograd traces forward and backward through the ops' fake
implementations and registered autograd, and the compiled block's outputs and gradients equal eager's.
The "aot_eager" compiler backend runs that traced graph without generating C++ (inductor's CPU codegen would
spend the test budget compiling C++; the custom ops are opaque to it either way). `torch.library.opcheck`
checks each custom op's schema, fake implementation and autograd registration against the real kernels.
"""
from __future__ import annotations

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
