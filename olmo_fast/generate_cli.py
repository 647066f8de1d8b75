"""`olmo-fast generate`: continue prompts with an OLMo checkpoint (or a preset with random weights)."""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load(model: str, device: str, dtype: torch.dtype, backend: str | None):
    """An HF / original OLMo checkpoint directory, or a preset name (random "mitchell" weights)."""
    from .config import PRESETS, ModelConfig
    from .model import OLMo

    if Path(model).is_dir():
        return OLMo.from_pretrained(model, dtype=dtype, device=device, backend=backend)
    if model not in PRESETS:
        raise ValueError(f"--model {model!r} is neither a checkpoint directory nor a preset ({', '.join(PRESETS)})")
    with torch.device("meta"):
        olmo = OLMo(ModelConfig.preset(model), backend=backend, init=False)
    olmo = olmo.to(dtype).to_empty(device=device)
    olmo.reset_parameters()
    return olmo


def _tokenizer(args: argparse.Namespace):
    from .tokenizer import TokenizerError, load_tokenizer

    if args.tokenizer:
        return load_tokenizer(args.tokenizer)
    if Path(args.model).is_dir() and (Path(args.model) / "tokenizer.json").is_file():
        return load_tokenizer(args.model)
    try:
        return load_tokenizer()
    except TokenizerError:
        if args.token_ids:  # ids in, ids out
            return None
        raise


def run(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError
    from .generation import generate
    from .tokenizer import TokenizerError

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    try:
        prompts = [[int(t) for t in p.replace(",", " ").split()] for p in args.prompts] if args.token_ids \
            else list(args.prompts)
    except ValueError:
        print("error: --token-ids prompts must be integers separated by spaces or commas", file=sys.stderr)
        return 2
    if not prompts:
        print("error: give at least one prompt", file=sys.stderr)
        return 2
    try:
        tokenizer = _tokenizer(args)
        model = load(args.model, device, dtype, args.backend).eval()
        eos = None if args.ignore_eos else model.config.eos_token_id
        single = len(prompts) == 1 and not args.json

        def shown(prompt: str | list[int]) -> str:
            if isinstance(prompt, str):
                return prompt
            return tokenizer.decode(prompt) if tokenizer is not None else " ".join(map(str, prompt)) + " "

        def stream(index: int, token: int, text: str) -> None:
            print(text if tokenizer is not None else f"{token} ", end="", flush=True)

        if single:
            print(shown(prompts[0]), end="", flush=True)
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as notices:
            warnings.simplefilter("always")
            results = generate(
                model, prompts, tokenizer=tokenizer, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop or (), eos_token_id=eos,
                stream=stream if single else None, truncate=args.truncate,
                empty_prompt_token=model.config.eos_token_id if args.allow_empty_prompt else None,
                cuda_graph=not args.no_cuda_graph and device.startswith("cuda"))
        elapsed = time.perf_counter() - start
    except (ValueError, TypeError, CheckpointError, TokenizerError) as err:
        print(f"\nerror: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([{"tokens": r.tokens, "text": r.text, "finish_reason": r.finish_reason} for r in results]))
    elif single:
        print()
    else:
        for i, (prompt, r) in enumerate(zip(prompts, results)):
            body = r.text if r.text is not None else " ".join(map(str, r.tokens))
            print(f"--- [{i}] ({r.finish_reason}, {len(r.tokens)} tokens)\n{shown(prompt)}{body}")
    for notice in notices:
        print(f"notice: {notice.message}", file=sys.stderr)
    total = sum(len(r.tokens) for r in results)
    reasons = ", ".join(r.finish_reason for r in results)
    print(f"[{total} new tokens in {elapsed:.2f} s, {total / max(elapsed, 1e-9):.1f} tokens/s; finished: {reasons}]",
          file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from prompts",
                       description="Continue each prompt with an OLMo model; one prompt streams to the terminal. "
                                   "Greedy by default; --temperature > 0 samples.")
    p.add_argument("prompts", nargs="*", help="prompt strings (or token ids with --token-ids)")
    p.add_argument("--model", required=True,
                   help="HF or original OLMo checkpoint directory, or a preset name with random weights")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the model directory's, else OLMo's dolma-v1_5)")
    p.add_argument("--token-ids", action="store_true", help="prompts are token ids separated by spaces or commas")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler (reproducible output)")
    p.add_argument("--stop", action="append", help="stop string (repeatable); not part of the printed text")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the EOS token")
    p.add_argument("--truncate", action="store_true",
                   help="drop the oldest prompt tokens to leave room for --max-new-tokens instead of failing")
    p.add_argument("--allow-empty-prompt", action="store_true",
                   help="start an empty prompt from the EOS token (OLMo's document separator)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--backend", choices=["torch", "triton", "cpp"], default=None, help="default: best available")
    p.add_argument("--no-cuda-graph", action="store_true", help="decode without capturing a CUDA graph")
    p.add_argument("--json", action="store_true", help="print the results as JSON (no streaming)")
    p.set_defaults(run=run)
