"""Training throughput: tokens/s and MFU of one training step of OLMo (default: OLMo-1B at 4096 context), ours
beside HF transformers' OlmoForCausalLM, with the same step in the same run.

The step is the trainer's (`olmo_fast/train/loop.py`: `OLMo.forward`'s summed loss): bf16 autocast over fp32 master
weights, summed fp32 cross-entropy over all tokens (ours: fused with the head on a GPU, as the trainer does),
global-norm clipping at 1.0, torch AdamW (fused on CUDA) with OLMo's settings;
only the model differs. MFU = tokens/s x `ModelConfig.flops_per_token(T)` over the card's data-sheet bf16 peak,
and over the bf16 matmul FLOP/s measured in this run.

    python -m olmo_fast.benchmarks.train_throughput [--model olmo-1b] [--seq-len 4096] [--batch 2] [--out F.json]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from olmo_fast import ModelConfig
from olmo_fast.train.loop import device_peak_flops

from . import ceilings, interrupt, models, report
from .suite import environment

VARIANTS = ("olmo-fast", "olmo-fast-torch", "hf-sdpa")


def _loss_sum(variant: str, model, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token CE over the batch: HF through its logits; ours through the trainer's own loss, which on
    a GPU with our kernels is the fused linear cross-entropy (no `[tokens, vocab]` logits)."""
    if variant.startswith("hf"):
        logits = model(input_ids=ids).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
    fused = variant == "olmo-fast" and ids.device.type == "cuda"
    return model(ids, ids, reduction="sum", fused=fused, check_inputs=False)[1]  # as the trainer


def measure(variant: str, cfg: ModelConfig, device: torch.device, batch: int, seq_len: int, steps: int,
            warmup: int) -> dict:
    """Build the variant's model and optimizer, run `warmup` untimed steps and `steps` timed ones."""
    if variant == "hf-sdpa":
        model = models.hf_olmo(cfg, device, torch.float32)
    else:
        model = models.olmo(cfg, device, torch.float32, backend="torch" if variant == "olmo-fast-torch" else None)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1,
                                  fused=device.type == "cuda" or None)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16)

    def step() -> torch.Tensor:
        with amp:
            loss = _loss_sum(variant, model, ids)
        (loss / ids.numel()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses = [step() for _ in range(steps)]
    sync()
    elapsed = time.perf_counter() - start
    final_loss = float(losses[-1]) / ids.numel()
    tokens_per_s = batch * seq_len * steps / elapsed
    return {"variant": variant, "batch": batch, "seq_len": seq_len, "steps": steps,
            "step_ms": elapsed / steps * 1e3, "tokens_per_s": tokens_per_s,
            "flops_per_token": cfg.flops_per_token(seq_len),
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
            "loss": final_loss}


def run(preset: str, seq_len: int, batch: int, steps: int, warmup: int, variants: list[str], device: torch.device,
        out: str | Path | None = None, log=print) -> dict:
    """Measure each variant; the results (rewritten to `out` atomically after each one) hold a record per variant.
    SIGINT/SIGTERM stop it with the records so far written (`interrupt.recording`)."""
    cfg = ModelConfig.preset(preset, max_sequence_length=seq_len)
    peak = device_peak_flops(device)  # the data sheet's dense bf16 peak (the trainer's table); None if unknown
    measured = ceilings.measure(device)["matmul_tflops"] * 1e12
    results = {"kind": "train_throughput", "title": f"Training throughput: {preset} at context {seq_len}",
               "note": f"One training step per row (bf16 autocast, fp32 master weights, AdamW, grad clipping), "
                       f"batch {batch} x {seq_len} tokens, {warmup} warm-up + {steps} timed steps; random tokens and "
                       f"weights. MFU against the data-sheet bf16 peak "
                       f"({f'{peak / 1e12:.1f}' if peak else 'unknown'} TFLOP/s) and against the "
                       f"{measured / 1e12:.1f} TFLOP/s bf16 matmul measured in this run.",
               "env": environment(device), "model": preset, "spec_peak_flops": peak,
               "measured_matmul_flops": measured, "records": []}
    save = (lambda: None) if out is None else (lambda: report.save_json(results, out))
    with interrupt.recording(results, save) as stop_check:
        for variant in variants:
            try:
                rec = measure(variant, cfg, device, batch, seq_len, steps, warmup)
                flops = rec["tokens_per_s"] * rec["flops_per_token"]
                rec["mfu_spec"] = flops / peak if peak else None
                rec["mfu_measured_matmul"] = flops / measured
                log(f"  {variant:<16} {rec['tokens_per_s']:>12,.0f} tok/s  step {rec['step_ms']:8.1f} ms  "
                    + (f"MFU {100 * rec['mfu_spec']:.1f}% of spec  " if peak else "")
                    + f"{100 * rec['mfu_measured_matmul']:.1f}% of measured matmul  loss {rec['loss']:.3f}")
            except Exception as err:  # noqa: BLE001 - an OOM or a missing kernel is a result, not a crash
                rec = {"variant": variant, "error": models.error_text(err)}
                log(f"  {variant:<16} error: {rec['error']}")
            results["records"].append(rec)
            save()
            models.free_memory(device)
            stop_check()
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="olmo-1b", help="preset (olmo-1b, olmo-7b, tiny, test)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=2, help="sequences per step")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated from {VARIANTS}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="JSON file for the results")
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if set(variants) - set(VARIANTS):
        p.error(f"unknown variants {sorted(set(variants) - set(VARIANTS))}; choose from {VARIANTS}")
    try:
        results = run(args.model, args.seq_len, args.batch, args.steps, args.warmup, variants,
                      torch.device(args.device), args.out)
    except KeyboardInterrupt:
        return models.interrupted(args.out)
    if args.out:
        print(f"wrote {args.out}")
    return models.exit_status(results)


if __name__ == "__main__":
    raise SystemExit(main())
