"""Generation throughput: greedy decoding tokens/s of random-weight OLMo models (default OLMo-1B and OLMo-7B, bf16)
at batch 1 and 16 with `decode_bench.benchmark_decode` (static KV cache, CUDA-graph step), beside HF transformers'
`generate` on the same shapes, and the fraction of the copy bandwidth measured in this run that decoding reaches
(weights + KV cache read per step, as `benchmark_decode` counts them).

    python -m olmo_fast.benchmarks.decode_throughput [--models olmo-1b,olmo-7b] [--batches 1,16] [--out F.json]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from olmo_fast import ModelConfig

from . import ceilings, interrupt, models, report
from .decode_bench import benchmark_decode
from .suite import environment


def hf_decode(model, cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """HF `generate` (greedy, its default cache): decode tokens/s from the time of `new_tokens` minus that of 1."""
    device = model.device
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt_len), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(n: int) -> float:
        sync()
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=cfg.pad_token_id)
        sync()
        return time.perf_counter() - start

    with torch.inference_mode():
        timed(2)  # warm-up
        one, full = timed(1), timed(new_tokens)
    step_s = (full - one) / (new_tokens - 1)
    return {"ms_per_token": step_s * 1e3, "tokens_per_s": batch / step_s, "prefill_ms": one * 1e3}


def _ours(model, cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int) -> dict:
    out = benchmark_decode(model, batch, prompt_len, new_tokens)
    return {k: out[k] for k in ("ms_per_token", "tokens_per_s", "prefill_ms", "cuda_graph", "achieved_gb_s")}


def run(presets: list[str], batches: list[int], prompt_len: int, new_tokens: int, device: torch.device,
        dtype: torch.dtype, hf: bool = True, out: str | Path | None = None, log=print) -> dict:
    """A record per (model, provider, batch); the results are rewritten to `out` atomically after each one.
    SIGINT/SIGTERM stop it with the records so far written (`interrupt.recording`)."""
    if new_tokens < 2:
        raise ValueError("new_tokens must be at least 2 (HF's decode time is that of n tokens minus that of 1)")
    copy_gbps = ceilings.measure(device)["copy_gbps"]
    results = {"kind": "decode_throughput", "title": "Generation throughput (greedy decoding)",
               "note": f"Random {str(dtype).removeprefix('torch.')} weights, prompts of {prompt_len} random tokens, "
                       f"{new_tokens} new tokens; copy bandwidth measured in this run: {copy_gbps:.0f} GB/s.",
               "env": environment(device), "copy_gbps": copy_gbps, "records": []}
    providers = {"olmo-fast": (lambda cfg: models.olmo(cfg, device, dtype).eval(), _ours)}
    if hf:
        providers["hf-generate"] = (lambda cfg: models.hf_olmo(cfg, device, dtype).eval(), hf_decode)
    save = (lambda: None) if out is None else (lambda: report.save_json(results, out))
    with interrupt.recording(results, save) as stop_check:
        for preset in presets:
            context = max(prompt_len + new_tokens, ModelConfig.preset(preset).max_sequence_length)
            cfg = ModelConfig.preset(preset, max_sequence_length=context)
            for provider, (build, measure) in providers.items():
                try:
                    model = build(cfg)
                except Exception as err:  # noqa: BLE001 - an OOM is a result
                    model, build_error = None, models.error_text(err)
                for batch in batches:
                    rec = {"model": preset, "provider": provider, "batch": batch, "prompt_len": prompt_len,
                           "new_tokens": new_tokens}
                    try:
                        if model is None:
                            raise RuntimeError(build_error)
                        rec.update(measure(model, cfg, batch, prompt_len, new_tokens))
                        if "achieved_gb_s" in rec:
                            rec["pct_copy_bw"] = 100 * rec["achieved_gb_s"] / copy_gbps
                        log(f"  {preset:<10} {provider:<12} batch {batch:>3}: {rec['tokens_per_s']:10.1f} tok/s "
                            f"{rec['ms_per_token']:8.3f} ms/step" + (f"  {rec['pct_copy_bw']:.1f}% of copy "
                                                                     f"bandwidth" if "pct_copy_bw" in rec else ""))
                    except Exception as err:  # noqa: BLE001 - an OOM or a missing kernel is a result
                        rec["error"] = models.error_text(err)
                        log(f"  {preset:<10} {provider:<12} batch {batch:>3}: error {rec['error']}")
                    results["records"].append(rec)
                    save()
                    stop_check()
                del model
                models.free_memory(device)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="olmo-1b,olmo-7b")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--no-hf", action="store_true", help="skip HF generate")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="JSON file for the results")
    args = p.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    try:
        results = run([m for m in args.models.split(",") if m], [int(b) for b in args.batches.split(",") if b],
                      args.prompt_len, args.new_tokens, torch.device(args.device), dtype, hf=not args.no_hf,
                      out=args.out)
    except KeyboardInterrupt:
        return models.interrupted(args.out)
    if args.out:
        print(f"wrote {args.out}")
    return models.exit_status(results)


if __name__ == "__main__":
    raise SystemExit(main())
