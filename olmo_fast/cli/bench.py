"""`olmo-fast bench`: the microbenchmark suite (`olmo_fast.benchmarks`), or `--compare A.json B.json`.

Exit status: 0; 1 if a row of ours (ours-triton, ours-cpp) failed its correctness check against eager (MISMATCH)
or raised; 2 for bad arguments; 130 if SIGINT/SIGTERM stopped it (bench.json then holds the rows measured).
"""
from __future__ import annotations

import argparse
import os
import sys

OPS_DEFAULT = "swiglu,layer_norm,rope,qkv_rope,qk_norm_rope,attention,decode_attention,linear_cross_entropy"


def _list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def run(args: argparse.Namespace) -> int:
    import torch

    from ..benchmarks import report, suite

    if args.compare:
        try:
            text, _ = report.compare(report.load(args.compare[0]), report.load(args.compare[1]))
        except (OSError, ValueError) as err:
            print(f"olmo-fast bench: error: {err}", file=sys.stderr)
            return 2
        print(text)
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        # Triton runs on a CPU only under its interpreter (a plumbing check there, not a speed); it must be set
        # before Triton is first imported. One thread by default: steady timings on a shared machine.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        torch.set_num_threads(args.threads or 1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    shapes = args.shapes or ("olmo-7b" if device.type == "cuda" else "cpu-small")
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    try:
        results = suite.run(_list(args.ops), shapes, _list(args.modes), dtype, device,
                            providers=_list(args.providers) if args.providers else None, out_dir=args.out,
                            warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, budget_s=args.budget_s,
                            plots=not args.no_plots)
    except ValueError as err:  # a bad --ops/--modes/--providers value
        print(f"olmo-fast bench: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # SIGINT/SIGTERM: the suite stopped and wrote what it measured
        kept = f"; the rows measured so far are in {os.path.join(args.out, 'bench.json')}" if args.out else ""
        print(f"olmo-fast bench: interrupted{kept}", file=sys.stderr)
        return 130
    print()
    print(report.table(results))
    failed = report.failed_rows(results["rows"])
    for row in failed:
        print(f"olmo-fast bench: FAILED {row['provider']} {row['op']} {row['shape']} {row['mode']}: "
              f"{report.failure_text(row)}", file=sys.stderr)
    return 1 if failed else 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="benchmark the kernels against eager, torch.compile, Liger, SDPA, flash-attn, apex",
        description="Time every op of olmo_fast.ops for each provider (ours and the alternatives) and mode, and "
                    "score it against the least bytes/FLOPs it must move and the card's copy bandwidth and matmul "
                    "FLOP/s measured in the same run. Writes bench.json, bench.csv and sweep plots to --out.")
    p.add_argument("--ops", default=OPS_DEFAULT, help=f"comma-separated ops (default: {OPS_DEFAULT})")
    p.add_argument("--modes", default="fwd,bwd,fwd+bwd", help="comma-separated: fwd, bwd, fwd+bwd")
    p.add_argument("--shapes", choices=["olmo-7b", "olmo-1b", "quick", "sweep", "cpu-small"],
                   help="shape set (default: olmo-7b on a GPU, cpu-small on the CPU)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--providers", help="comma-separated provider names to run (default: all; on the CPU all but "
                                       "torch-compile); the others are listed as not selected")
    p.add_argument("--out", help="directory for bench.json, bench.csv and plot-<op>.png")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                   help="print per-row time ratios A/B of two result files (> 1: B is faster) and exit")
    p.add_argument("--warmup-ms", type=float, help="warm-up time per measurement (default 25 GPU, 10 CPU)")
    p.add_argument("--rep-ms", type=float, help="timed repetitions' budget per measurement (default 100 GPU, 50 CPU)")
    p.add_argument("--budget-s", type=float, help="stop starting new measurements after this many seconds")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default on the CPU: 1)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.set_defaults(run=run)
