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


class UsageError(ValueError):
    """A bad flag or prompt, found before anything is loaded."""


def check_model_name(model: str) -> None:
    """Raise UsageError unless `model` is a checkpoint directory or a preset name."""
    from ..config import PRESETS

    if Path(model).is_dir() or model in PRESETS:
        return
    if Path(model).exists():
        raise UsageError(f"--model {model!r} is a file, not a checkpoint directory")
    raise UsageError(f"--model {model!r} is neither a checkpoint directory nor a preset ({', '.join(PRESETS)})")


def load(model: str, device: str, dtype: torch.dtype, backend: str | None, trust_pickle: bool = False):
    """An HF / original OLMo checkpoint directory (pickled weights only with `trust_pickle`), or a preset name
    (random weights, the preset's init)."""
    from ..config import ModelConfig
    from ..model import OLMo

    check_model_name(model)
    if Path(model).is_dir():
        return OLMo.from_pretrained(model, dtype=dtype, device=device, backend=backend, trust_pickle=trust_pickle)
    with torch.device("meta"):
        olmo = OLMo(ModelConfig.preset(model), backend=backend, init=False)
    olmo = olmo.to(dtype).to_empty(device=device)
    olmo.reset_parameters()
    return olmo


def model_tokenizer(model: str, tokenizer: str | None, optional: bool = False):
    """`--tokenizer`, else the model folder's tokenizer.json, else OLMo's tokenizer of the model (dolma2 for OLMo
    2/3's EOS id, else dolma-v1_5); None where that is missing and the tokenizer is `optional` (generate's
    --token-ids: ids in, ids out)."""
    from ..config import ModelConfig
    from ..tokenizer import TokenizerError, load_tokenizer, olmo_tokenizer_name

    if tokenizer:
        return load_tokenizer(tokenizer)
    if Path(model).is_dir() and (Path(model) / "tokenizer.json").is_file():
        return load_tokenizer(model)
    check_model_name(model)
    config = ModelConfig.from_file(model) if Path(model).is_dir() else ModelConfig.preset(model)
    try:
        return load_tokenizer(name=olmo_tokenizer_name(config.eos_token_id))
    except TokenizerError:
        if optional:
            return None
        raise


def model_dtype(name: str | None, device: str) -> torch.dtype:
    """`--dtype`, else bf16 on a GPU and fp32 on the CPU."""
    return DTYPES[name] if name else (torch.bfloat16 if device.startswith("cuda") else torch.float32)


def _prompts(args: argparse.Namespace) -> list[str] | list[list[int]]:
    if args.token_ids:
        try:
            prompts = [[int(t) for t in p.replace(",", " ").split()] for p in args.prompts]
        except ValueError:
            raise UsageError("--token-ids prompts must be integers separated by spaces or commas") from None
    else:
        prompts = list(args.prompts)
    if not prompts:
        raise UsageError("give at least one prompt")
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty and not args.allow_empty_prompt:
        raise UsageError(f"prompt {empty[0]} is empty: pass --allow-empty-prompt to start it from the EOS token")
    return prompts


def _check_flags(args: argparse.Namespace) -> None:
    checks = [
        (args.max_new_tokens >= 0, f"--max-new-tokens must be >= 0, got {args.max_new_tokens}"),
        (args.temperature >= 0, f"--temperature must be >= 0 (0 = greedy), got {args.temperature}"),
        (args.top_k is None or args.top_k >= 0, f"--top-k must be >= 0 (0 = off), got {args.top_k}"),
        (0 < args.top_p <= 1, f"--top-p must lie in (0, 1], got {args.top_p}"),
        (all(args.stop or ()), "--stop strings must be non-empty"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def _device(name: str | None) -> str:
    """`name` checked to be usable here (default: cuda if available, else cpu)."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda":
        try:
            torch.empty(0, device=device)
        except (AssertionError, RuntimeError) as err:  # CPU-only torch asserts; no driver / bad ordinal raise
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UsageError(f"--device {name}: CUDA is not usable here ({reason})") from None
    return name


def _check_backend(backend: str | None, device: str) -> None:
    """An explicit --backend must run on the device's type (ops it lacks still fail when first called)."""
    if backend in (None, "torch"):
        return
    from ..ops import dispatch

    entry = dispatch.status()[backend]
    if "unavailable" in entry:
        raise UsageError(f"--backend {backend} is unavailable here: {entry['unavailable']}")
    device_type = torch.device(device).type
    if device_type not in entry["devices"]:
        raise UsageError(f"--backend {backend} runs on {', '.join(entry['devices'])}, not on {device_type}")


def _checked_inputs(args: argparse.Namespace) -> tuple[list[str] | list[list[int]], str]:
    """The prompts and the device, after every check that needs no tokenizer or model (else UsageError)."""
    prompts = _prompts(args)
    _check_flags(args)
    device = _device(args.device)
    check_model_name(args.model)
    _check_backend(args.backend, device)
    return prompts, device


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import CheckpointError
    from ..generation import generate
    from ..ops import BackendError
    from ..tokenizer import TokenizerError

    mid_line = False  # stdout holds a partial line (a streamed prompt) that an error must end first
    try:
        prompts, device = _checked_inputs(args)
        dtype = model_dtype(args.dtype, device)
        tokenizer = model_tokenizer(args.model, args.tokenizer, optional=args.token_ids)
        model = load(args.model, device, dtype, args.backend, args.trust_pickle_checkpoint).eval()
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
            mid_line = True
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
    except (ValueError, TypeError, CheckpointError, TokenizerError, BackendError) as err:
        if mid_line:
            print(flush=True)
        where = f"--backend {args.backend}: " if isinstance(err, BackendError) else ""
        print(f"error: {where}{err}", file=sys.stderr)
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


def add_trust_pickle_flag(parser) -> None:
    parser.add_argument("--trust-pickle-checkpoint", action="store_true",
                        help="read weights from pytorch_model.bin / model.pt, which are pickles (reading one can run "
                             "code it holds): only for a folder you trust; safetensors never need it")


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from prompts",
                       description="Continue each prompt with an OLMo model; one prompt streams to the terminal. "
                                   "Greedy by default; --temperature > 0 samples.")
    p.add_argument("prompts", nargs="*", help="prompt strings (or token ids with --token-ids)")
    p.add_argument("--model", required=True,
                   help="HF or original OLMo checkpoint directory, or a preset name with random weights")
    add_trust_pickle_flag(p)
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
