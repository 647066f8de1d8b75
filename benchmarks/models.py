"""Random-weight models for the throughput benches: ours (`olmo_fast.OLMo`) and HF transformers'
`OlmoForCausalLM` with the same configuration, built straight on the device (no CPU-side fp32 copy of a 7B); and
what both benches share: freeing memory between models, a failed record's error text, their exit statuses."""
from __future__ import annotations

import gc
import sys

import torch

from olmo_fast import ModelConfig, OLMo


def olmo(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, backend: str | None = None) -> OLMo:
    """The preset's init (OLMo 1: "mitchell", OLMo 2/3: normal 0.02), run on `device` in `dtype`."""
    with torch.device("meta"):
        model = OLMo(cfg, backend=backend, init=False)
    model = model.to(dtype).to_empty(device=device)
    model.reset_parameters()
    return model


def hf_olmo(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, attn: str = "sdpa"):
    """transformers' OlmoForCausalLM / Olmo2ForCausalLM / Olmo3ForCausalLM of the same shape (its own init),
    `attn` its attention implementation."""
    import transformers

    hf_cfg = {k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "model_type")}
    config = transformers.AutoConfig.for_model(cfg.architecture, **hf_cfg, attn_implementation=attn)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(default)
    return model


def free_memory(device: torch.device) -> None:
    """Return a dropped model's memory before the next one is built (collect, then empty CUDA's cache)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def error_text(err: BaseException) -> str:
    """A failed record's error: the exception's type and the first line of its message (300 characters)."""
    lines = str(err).splitlines()
    return f"{type(err).__name__}: {lines[0][:300]}" if lines else type(err).__name__


def interrupted(out: str | None) -> int:
    """What a throughput bench's `main` does when SIGINT/SIGTERM stopped it: say where its records are; 130."""
    kept = f"; the records measured so far are in {out}" if out else ""
    print(f"interrupted{kept}", file=sys.stderr)
    return 130


def exit_status(results: dict) -> int:
    """A throughput bench's exit status: 1 if a record failed (its error is in the results and was logged)."""
    return 1 if any("error" in rec for rec in results["records"]) else 0
