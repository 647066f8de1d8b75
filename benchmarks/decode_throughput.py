"""Generation throughput: greedy decoding tokens/s of random-weight OLMo models (default OLMo-1B and OLMo-7B, bf16)
at batch 1 and 16 with `olmo_fast.benchmark_decode` (static KV cache, CUDA-graph step), beside HF transformers'
`generate` on the same shapes, and the fraction of the copy bandwidth measured in this run that decoding reaches
(weights + KV cache read per step, as `benchmark_decode` counts them).

    python -m olmo_fast.benchmarks.decode_throughput [--models olmo-1b,olmo-7b] [--batches 1,16] [--out F.json]
"""
from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

from olmo_fast import ModelConfig, benchmark_decode

from . import ceilings, models
from .suite import environment


def hf_decode(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, batch: int, prompt_len: int,
              new_tokens: int) -> dict:
    """HF `generate` (greedy, its default cache): decode tokens/s from the time of `new_tokens` minus that of 1."""
    model = models.hf_olmo(cfg, device, dtype).eval()
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
    del model
    return {"ms_per_token": step_s * 1e3, "tokens_per_s": batch / step_s, "prefill_ms": one * 1e3}


def run(presets: list[str], batches: list[int], prompt_len: int, new_tokens: int, device: torch.device,
        dtype: torch.dtype, hf: bool = True, log=print) -> dict:
    copy_gbps = ceilings.measure(device)["copy_gbps"]
    records = []
    for preset in presets:
        cfg = ModelConfig.preset(preset, max_sequence_length=max(prompt_len + new_tokens,
                                                                 ModelConfig.preset(preset).max_sequence_length))
        for provider in ("olmo-fast",) + (("hf-generate",) if hf else ()):
            for batch in batches:
                rec = {"model": preset, "provider": provider, "batch": batch, "prompt_len": prompt_len,
                       "new_tokens": new_tokens}
                try:
                    if provider == "olmo-fast":
                        model = models.olmo(cfg, device, dtype).eval()
                        out = benchmark_decode(model, batch, prompt_len, new_tokens)
                        del model
                        rec.update({k: out[k] for k in ("ms_per_token", "tokens_per_s", "prefill_ms", "cuda_graph",
                                                        "achieved_gb_s")})
                        rec["pct_copy_bw"] = 100 * out["achieved_gb_s"] / copy_gbps
                    else:
                        rec.update(hf_decode(cfg, device, dtype, batch, prompt_len, new_tokens))
                    log(f"  {preset:<10} {provider:<12} batch {batch:>3}: {rec['tokens_per_s']:10.1f} tok/s "
                        f"{rec['ms_per_token']:8.3f} ms/step" + (f"  {rec['pct_copy_bw']:.1f}% of copy bandwidth"
                                                                 if "pct_copy_bw" in rec else ""))
                except Exception as err:  # noqa: BLE001 - an OOM or a missing kernel is a result
                    rec["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                    log(f"  {preset:<10} {provider:<12} batch {batch:>3}: error {rec['error']}")
                records.append(rec)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return {"kind": "decode_throughput", "title": "Generation throughput (greedy decoding)",
            "note": f"Random {str(dtype).removeprefix('torch.')} weights, prompts of {prompt_len} random tokens, "
                    f"{new_tokens} new tokens; copy bandwidth measured in this run: {copy_gbps:.0f} GB/s.",
            "env": environment(device), "copy_gbps": copy_gbps, "records": records}


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
    results = run([m for m in args.models.split(",") if m], [int(b) for b in args.batches.split(",") if b],
                  args.prompt_len, args.new_tokens, torch.device(args.device), dtype, hf=not args.no_hf)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
