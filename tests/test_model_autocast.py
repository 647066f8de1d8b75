"""bf16 autocast (how the trainer runs on a GPU): the residual stream stays fp32 while branch outputs are bf16,
so the fused norms meet mixed dtypes. Every backend must promote as `x + residual` does and match "torch"."""
import contextlib

import pytest
import torch
from conftest import DEVICE, require_kernel

from olmo_fast import ModelConfig, OLMo, ops


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_autocast_bf16_matches_torch_backend(backend, monkeypatch):
    require_kernel("layer_norm_fwd", backend)
    if backend == "triton" and DEVICE == "cpu":
        # The Triton interpreter's bf16 tl.dot is wrong (triton-lang/triton#11584): on the CPU, attention falls
        # back to torch here; the GPU run covers Triton attention under autocast.
        from olmo_fast.ops import dispatch

        monkeypatch.delitem(dispatch._KERNELS, ("attention_fwd", "triton", DEVICE))
    model = OLMo(ModelConfig.preset("test", n_layers=1, clip_qkv=0.5)).to(DEVICE)
    ids = torch.randint(0, 250, (2, 19), device=DEVICE)
    losses, grads = {}, {}
    for name in ("torch", backend):
        # Prefer the backend's kernels, falling back per op where it has none (cpp on a GPU: no attention).
        model.set_backend("torch" if name == "torch" else None).zero_grad()
        preference = contextlib.nullcontext() if name == "torch" else ops.prefer(backend)
        with preference, torch.autocast(device_type=DEVICE, dtype=torch.bfloat16):
            _, loss = model(ids, labels=ids)
        loss.backward()
        losses[name] = loss.item()
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters()])
    # bf16 matmuls dominate the error; both backends share them, the norms differ only in rounding order.
    assert losses[backend] == pytest.approx(losses["torch"], rel=1e-2)
    assert torch.isfinite(grads[backend]).all()
    cos = torch.nn.functional.cosine_similarity(grads[backend], grads["torch"], dim=0)
    assert cos > 0.99
