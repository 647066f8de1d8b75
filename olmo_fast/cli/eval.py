"""`olmo-fast eval`: OLMo's downstream tasks (model-card accuracy) for a checkpoint, offline.

Every input is checked before the model loads (unknown task, missing model, bad --limit: one line, exit 2).
`--out` is rewritten atomically after every task, so an interrupted run keeps the tasks it finished.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from .generate import (
    DTYPES,
    UsageError,
    _check_backend,
    _device,
    add_trust_pickle_flag,
    check_model_name,
    load,
    model_dtype,
    model_tokenizer,
)


def _tasks(spec: str) -> list[str]:
    names = [t.strip() for t in spec.split(",") if t.strip()]
    if not names:
        raise UsageError("--tasks: give at least one task name (comma-separated)")
    return names


def _checked(args: argparse.Namespace):
    """(tasks, device) after every check that needs no model (else UsageError / TaskError)."""
    from ..eval.runner import resolve_tasks

    tasks = resolve_tasks(_tasks(args.tasks))
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    if args.batch_tokens < 1:
        raise UsageError(f"--batch-tokens must be >= 1, got {args.batch_tokens}")
    if args.out is not None:
        out = Path(args.out)
        if out.is_dir():
            raise UsageError(f"--out {args.out} is a directory; give a file name (results.json)")
        if not out.parent.is_dir():
            raise UsageError(f"--out {args.out}: folder {out.parent} does not exist")
    device = _device(args.device)
    check_model_name(args.model)
    _check_backend(args.backend, device)
    return [t.name for t in tasks], device


def load_model(model: str, device: str, dtype: torch.dtype, backend: str | None, trust_pickle: bool = False):
    """A model folder (training checkpoint, HF or OLMo layout; pickled weights only with `trust_pickle`), else a
    preset with random weights."""
    from ..eval.loading import load_checkpoint

    if Path(model).is_dir():
        return load_checkpoint(model, dtype=dtype, device=device, backend=backend, trust_pickle=trust_pickle)
    return load(model, device, dtype, backend)


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write `payload` to `path` through a temporary file in the same folder and a rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import CheckpointError
    from ..eval.runner import TaskResult, evaluate, results_table
    from ..ops import BackendError
    from ..tokenizer import TokenizerError

    payload: dict = {"model": args.model, "limit": args.limit, "complete": False, "tasks": {}}

    def on_result(result: TaskResult) -> None:
        payload["tasks"][result.task] = result.as_dict(with_loglikelihoods=args.per_example)
        if args.out:
            write_json_atomic(Path(args.out), payload)

    try:
        tasks, device = _checked(args)
        tokenizer = model_tokenizer(args.model, args.tokenizer)
        model = load_model(args.model, device, model_dtype(args.dtype, device), args.backend,
                           args.trust_pickle_checkpoint).eval()
        start = time.perf_counter()
        results = evaluate(model, tasks, tokenizer=tokenizer, limit=args.limit, batch_tokens=args.batch_tokens,
                           compare_naive=args.compare_naive, progress=not args.no_progress, on_result=on_result)
        payload["complete"] = True
        if args.out:
            write_json_atomic(Path(args.out), payload)
    except (ValueError, CheckpointError, TokenizerError, BackendError) as err:  # UsageError, TaskError included
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # reading the model or the task data, writing --out
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(results_table(results))
    tokens = sum(r.tokens for r in results.values())
    seconds = sum(r.seconds for r in results.values())
    summary = (f"[{len(results)} tasks in {time.perf_counter() - start:.1f} s; "
               f"scoring {tokens / max(seconds, 1e-9):,.0f} tokens/s")
    if args.compare_naive:
        naive = sum(r.naive_seconds for r in results.values())
        worst = max(r.max_rel_diff for r in results.values())
        summary += (f"; one forward per choice (OLMo's scheme) {tokens / max(naive, 1e-9):,.0f} tokens/s: "
                    f"{naive / max(seconds, 1e-9):.2f}x faster shared, largest relative log-likelihood difference "
                    f"{worst:.1e}")
    print(summary + "]", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="downstream accuracy (ARC, HellaSwag, MMLU ...) as OLMo scores it",
                       description="Score a model on OLMo's downstream tasks, offline, as allenai/OLMo's ICLMetric "
                                   "does; one shared forward per context. Task names follow OLMo's "
                                   "label_to_task_map: arc_easy_rc_5shot, hellaswag_mc_5shot, copa_rc_0shot, "
                                   "mmlu_stem_mc_5shot ...; a bare name (arc_easy) is its rc_5shot variant; mmlu = "
                                   "the four 5-shot multiple-choice categories.")
    p.add_argument("--model", required=True, help="HF or original OLMo model directory, a training checkpoint "
                                                   "(stepN/), or a preset name with random weights")
    add_trust_pickle_flag(p)
    p.add_argument("--tasks", required=True, help="comma-separated task names")
    p.add_argument("--limit", type=int, default=None, help="score the first N documents of each task")
    p.add_argument("--out", default=None, help="results JSON, rewritten after every task")
    p.add_argument("--per-example", action="store_true", help="also write every choice's log-likelihood to --out")
    p.add_argument("--batch-tokens", type=int, default=2048, help="padded tokens per forward (default 2048)")
    p.add_argument("--compare-naive", action="store_true",
                   help="also score each task as OLMo does (one forward per choice) and report the speedup")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the model directory's, else OLMo's dolma-v1_5)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--backend", choices=["torch", "triton", "cpp"], default=None, help="default: best available")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)
