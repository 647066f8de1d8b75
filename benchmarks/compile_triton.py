"""Compile every Triton kernel for GPU targets offline (no GPU needed) and report registers and spills.

    python -m olmo_fast.benchmarks.compile_triton                      # sm_90 and gfx90a, bf16, every config
    python -m olmo_fast.benchmarks.compile_triton --targets sm_90 --cases swiglu_fwd --dtype fp16
    python -m olmo_fast.benchmarks.compile_triton --targets sm_80,sm_90,gfx90a --json report.json   # CI

Each case calls a kernel module's host function (its KERNELS entry) on CPU tensors of OLMo-7B's widths
(d_model 4096, 32 heads of 128, SwiGLU hidden 11008, vocabulary 50304) with the launch intercepted: the
arguments it would launch with are bound and specialised by Triton's own JIT machinery for the target (16-byte
pointer alignment and divisibility of integers, as on a GPU) and compiled with `triton.compile` - for autotuned
kernels once per config that the kernel's autotune prune keeps for the target (`kernels/_tuning.py`: the
backend's configs that fit its shared memory and registers), under `_tuning.use_target`, so warp counts, dot
precision and pruning are those the target would get.

One line per distinct compiled variant: case/kernel, target, constexprs that vary, warps/stages, registers
(NVIDIA: ptxas -v; AMD: VGPRs from the code object's metadata), spill bytes (NVIDIA: stores/loads; AMD: spilled
VGPRs+SGPRs and scratch bytes), shared memory and compile seconds. `--json PATH` also writes every variant with
its instruction counts: PTX `wgmma.mma_async`, `mma.sync`, TMA `cp.async.bulk.tensor` (NVIDIA), `v_mfma` (AMD);
rewritten after each variant, so an interrupted run leaves what it compiled. Exit status 1 when any variant fails
to compile or spills more than `_tuning.SPILL_BUDGET_BYTES` per thread.
Uses Triton's JIT helpers `create_function_from_signature` and `JITFunction._pack_args` (private; checked on
triton 3.6 and 3.9). The kernels must not be interpreted: under TRITON_INTERPRET=1 the module re-runs itself
with TRITON_INTERPRET=0.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

TARGETS = {"sm_80": ("cuda", 80, 32), "sm_90": ("cuda", 90, 32), "gfx90a": ("hip", "gfx90a", 64),
           "gfx942": ("hip", "gfx942", 64)}  # triton's GPUTarget(backend, arch, warp size); limits: kernels/_tuning
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# Instruction counts reported per variant: name -> (assembly, pattern at the start of an instruction).
INSTRUCTIONS = {"wgmma": ("ptx", r"wgmma\.mma_async"), "mma": ("ptx", r"mma\.sync"),
                "tma": ("ptx", r"cp\.async\.bulk\.tensor"), "mfma": ("amdgcn", r"v_mfma")}


@dataclass
class Result:
    case: str
    kernel: str
    target: str
    config: str
    num_warps: int
    num_stages: int
    registers: int | None = None
    spill_bytes: int | None = None
    scratch_bytes: int | None = None
    shared_bytes: int | None = None
    seconds: float = 0.0
    instructions: dict[str, int] | None = None
    error: str | None = None
    over_budget: bool = False

    def line(self) -> str:
        head = (f"{self.case + '/' + self.kernel:<46} {self.target:<6} {self.config:<36} "
                f"w{self.num_warps:<2} s{self.num_stages}")
        if self.error:
            return f"{head}  FAILED: {self.error}"
        regs = "?" if self.registers is None else self.registers
        spill = "?" if self.spill_bytes is None else self.spill_bytes
        scratch = "" if self.scratch_bytes is None else f" scratch={self.scratch_bytes}B"
        flag = "  OVER SPILL BUDGET" if self.over_budget else ""
        return (f"{head}  regs={regs} spill={spill}B{scratch} smem={self.shared_bytes}B  "
                f"{self.seconds:.1f}s{flag}")


def _cases(dtype) -> dict[str, Callable[[], object]]:
    """Name -> a call of a KERNELS function on representative CPU tensors (OLMo-7B widths, clip 8 as OLMo 1.7)."""
    import torch

    from olmo_fast.kernels import (
        _launch,
        attention,
        attention_tma,
        decode_attention,
        layer_norm,
        linear_cross_entropy,
        qkv_rope,
        rope,
        swiglu,
    )

    d, heads, head_dim, hidden, vocab, rows, seq, cache = 4096, 32, 128, 11008, 50304, 4, 256, 4096
    window = 64  # < seq: the windowed attention kernels

    def r(*shape, dt=dtype):
        return torch.randn(*shape, dtype=dt)

    x, w, rstd = r(rows, d), r(d), r(rows, dt=torch.float32)
    long = r(rows, 2 * _launch.MAX_FUSED + 8)  # the looped (not single-pass) path
    q, qkv = r(1, seq, heads, head_dim), r(1, seq, 3 * d)
    lse, scale = r(1, heads, seq, dt=torch.float32), head_dim ** -0.5
    kv = r(1, cache, heads, head_dim)
    return {
        "layer_norm_fwd": lambda: layer_norm.layer_norm_fwd(x, x, 1e-5),
        "layer_norm_bwd": lambda: layer_norm.layer_norm_bwd(x, x, rstd, x),
        "layer_norm_fwd_long": lambda: layer_norm.layer_norm_fwd(long, None, 1e-5),
        "layer_norm_bwd_long": lambda: layer_norm.layer_norm_bwd(long, long, rstd, None),
        "norm_fwd": lambda: layer_norm.norm_fwd(x, x, w, w, 1e-5, False),
        "norm_bwd": lambda: layer_norm.norm_bwd(x, x, w, rstd, rstd, x, True, False),
        "rms_norm_fwd": lambda: layer_norm.norm_fwd(x, None, w, None, 1e-6, True),
        "rms_norm_bwd": lambda: layer_norm.norm_bwd(x, x, w, None, rstd, None, False, True),
        "rms_norm_add_fwd": lambda: layer_norm.rms_norm_add_fwd(x, w, x, 1e-6),  # OLMo 2's post-norm
        "rms_norm_add_fwd_long": lambda: layer_norm.rms_norm_add_fwd(long, None, long, 1e-6),
        "rms_norm_add_bwd": lambda: layer_norm.rms_norm_add_bwd(x, x, w, rstd),
        "swiglu_fwd": lambda: swiglu.swiglu_fwd(r(rows, 2 * hidden)),
        "swiglu_bwd": lambda: swiglu.swiglu_bwd(r(rows, hidden), r(rows, 2 * hidden)),
        "rope": lambda: rope.rope(q, None, 0, 10000.0, False),
        "rope_positions": lambda: rope.rope(q, torch.arange(seq).expand(1, seq), 0, 10000.0, True),
        "qkv_rope_fwd": lambda: qkv_rope.qkv_rope_fwd(qkv, heads, heads, 8.0, None, 0, 10000.0),
        "qkv_rope_bwd": lambda: qkv_rope.qkv_rope_bwd(q, q, q, qkv, 8.0, None, 0, 10000.0),
        **{f"qk_norm_rope_{name}": call for name, call in _qk_norm_rope_cases(r, seq, head_dim).items()},
        "attention_fwd": lambda: attention.attention_fwd(q, q, q, True, 8.0, scale),
        "attention_fwd_tma": lambda: attention_tma.attention_fwd_tma(q, q, q, True, 8.0, scale),  # "fa2" pre-sm_90
        "attention_fwd_tma_persistent": lambda: attention_tma.attention_fwd_tma(q, q, q, True, 8.0, scale,
                                                                                persistent=True),
        "attention_bwd": lambda: attention.attention_bwd(q, q, q, q, q, lse, True, 8.0, scale),
        "attention_bwd_atomic": lambda: attention.attention_bwd(q, q, q, q, q, lse, True, 8.0, scale, atomic_dq=True),
        # sliding windows (OLMo 3's local layers; a window shorter than the sequence): the windowed kernels
        "attention_fwd_window": lambda: attention.attention_fwd(q, q, q, True, 8.0, scale, window),
        "attention_fwd_tma_window": lambda: attention_tma.attention_fwd_tma(q, q, q, True, 8.0, scale, window),
        "attention_bwd_window": lambda: attention.attention_bwd(q, q, q, q, q, lse, True, 8.0, scale, window),
        "attention_bwd_atomic_window": lambda: attention.attention_bwd(q, q, q, q, q, lse, True, 8.0, scale, window,
                                                                       atomic_dq=True),
        "decode_attention": lambda: decode_attention.decode_attention(
            r(1, 1, heads, head_dim), kv, kv, torch.tensor([cache]), num_splits=4),
        "decode_attention_window": lambda: decode_attention.decode_attention(
            r(1, 1, heads, head_dim), kv, kv, torch.tensor([cache]), window=1024, num_splits=4),
        "cross_entropy_chunk": lambda: linear_cross_entropy.cross_entropy_chunk(
            r(rows, vocab), torch.randint(0, vocab, (rows,)), -100, True),
    }


def _qk_norm_rope_cases(r, seq: int, head_dim: int) -> dict[str, Callable[[], object]]:
    """OLMo 2's QK-norm prologue at 7B (32 heads: one tile, single pass), 13B (40 heads: padded to a tile of 8192),
    32B (40 query heads, 8 key/value heads) and 128 query heads (wider than a tile: the two-pass path)."""
    import torch

    from olmo_fast.kernels import qk_norm_rope, rope

    freqs = rope.inv_freq(head_dim, 500000.0, torch.device("cpu"))
    cases = {}
    for name, hq, hkv in (("7b", 32, 32), ("13b", 40, 40), ("32b", 40, 8), ("wide", 128, 8)):
        qkv, wq, wk = r(1, seq, (hq + 2 * hkv) * head_dim), r(hq * head_dim), r(hkv * head_dim)
        grads = r(1, seq, hq, head_dim), r(1, seq, hkv, head_dim), r(1, seq, hkv, head_dim)
        rstd = r(seq, 2, dt=torch.float32)
        cases[f"fwd_{name}"] = functools.partial(qk_norm_rope.qk_norm_rope_fwd, qkv, wq, wk, hq, hkv, 1e-6, None,
                                                 0, freqs, 1.0)
        cases[f"bwd_{name}"] = functools.partial(qk_norm_rope.qk_norm_rope_bwd, *grads, qkv, wq, wk, rstd, None,
                                                 0, freqs, 1.0)
    return cases


@contextlib.contextmanager
def _intercepted_launches() -> Iterator[list]:
    """Record `kernel[grid](*args, **kwargs)` calls instead of launching them."""
    from triton.runtime.jit import KernelInterface

    calls: list = []
    getitem = KernelInterface.__getitem__
    KernelInterface.__getitem__ = lambda self, grid: lambda *args, **kwargs: calls.append((self, args, kwargs))
    try:
        yield calls
    finally:
        KernelInterface.__getitem__ = getitem


def _variants(kernel, args: tuple, kwargs: dict) -> list[tuple[object, dict]]:
    """(JITFunction, launch kwargs) for a plain kernel, or one per autotune config its prune keeps for the target
    (`_tuning.use_target`'s)."""
    configs = getattr(kernel, "configs", None)
    if configs is None:
        return [(kernel, kwargs)]
    if kernel.early_config_prune is not None:
        configs = kernel.early_config_prune(configs, dict(zip(kernel.arg_names, args)), **kwargs)
    return [(kernel.fn, {**kwargs, **config.all_kwargs()}) for config in configs]


def _resources(compiled, ptxas_log: str) -> dict:
    """Registers and spills from the ptxas log (NVIDIA) or the AMD code object's assembly."""
    if "amdgcn" in compiled.asm:
        asm = compiled.asm["amdgcn"]

        def field(pattern):
            found = re.search(pattern, asm)
            return int(found.group(1)) if found else None

        spills = [field(r"\.vgpr_spill_count:\s+(\d+)"), field(r"\.sgpr_spill_count:\s+(\d+)")]
        return dict(registers=field(r"; NumVgprs:\s+(\d+)"), scratch_bytes=field(r"; ScratchSize:\s+(\d+)"),
                    spill_bytes=None if None in spills else 4 * sum(spills), instructions=_counts(compiled.asm))
    regs = re.search(r"Used (\d+) registers", ptxas_log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    return dict(registers=int(regs.group(1)) if regs else None,
                spill_bytes=int(spill.group(1)) + int(spill.group(2)) if spill else None,
                instructions=_counts(compiled.asm))


def _counts(asm: dict) -> dict[str, int]:
    """Counts of the INSTRUCTIONS whose assembly the compiled kernel has (PTX for NVIDIA, amdgcn for AMD)."""
    return {name: len(re.findall(rf"^\s*(?:@!?%\w+\s+)?{pattern}", asm[kind], flags=re.M))
            for name, (kind, pattern) in INSTRUCTIONS.items() if kind in asm}


def _compile(fn, args: tuple, kwargs: dict, target) -> tuple[object, dict, str]:
    """Specialise a launch as Triton's JIT does for `target` and compile it; -> (kernel, options, ptxas log)."""
    import triton
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    return compiled, options.__dict__, log.getvalue()


@contextlib.contextmanager
def _fresh_compiles() -> Iterator[None]:
    """An empty Triton cache (a cached kernel skips ptxas, and its log) and ptxas' -v log printed."""
    saved = {k: os.environ.get(k) for k in ("TRITON_CACHE_DIR", "TRITON_DUMP_PTXAS_LOG")}
    with tempfile.TemporaryDirectory(prefix="compile_triton.") as cache:
        os.environ.update(TRITON_CACHE_DIR=cache, TRITON_DUMP_PTXAS_LOG="1")
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _varying(kwargs: dict) -> str:
    """The block sizes and path flags that tell a kernel's variants apart (warps and stages are shown apart)."""
    keys = sorted(k for k in kwargs if k.startswith("BLOCK") or k in ("SINGLE_PASS", "ROWS", "SINGLE"))
    return " ".join(f"{k}={kwargs[k]}" for k in keys)


def compile_all(targets: list[str], cases: list[str] | None = None, dtype: str = "bf16",
                first_config_only: bool = False, echo: bool = True,
                on_result: Callable[[list[Result]], None] | None = None) -> list[Result]:
    """Compile the selected cases for the named targets; one Result per distinct variant (printed if `echo`;
    `on_result` called with the results so far after each)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_all needs TRITON_INTERPRET unset or 0 (the kernels must be compiled, "
                           "not interpreted)")
    import torch
    from triton.backends.compiler import GPUTarget

    from olmo_fast.kernels import _tuning

    table = _cases(getattr(torch, DTYPES[dtype]))
    unknown = sorted(set(cases or ()) - set(table))
    if unknown:
        raise ValueError(f"unknown cases {unknown}; known: {sorted(table)}")
    results: list[Result] = []
    with _fresh_compiles():
        for name in targets:
            target, seen = GPUTarget(*TARGETS[name]), set()
            for case, call in table.items():
                if cases and case not in cases:
                    continue
                with _tuning.use_target(_tuning.TARGETS[name]), _intercepted_launches() as calls:
                    call()
                    variants = [(args, v) for kernel, args, kwargs in calls
                                for v in _variants(kernel, args, kwargs)[:1 if first_config_only else None]]
                for args, (fn, launch) in variants:
                    key = (fn.__name__, _args_key(args), repr(sorted(launch.items(), key=str)))
                    if key not in seen:
                        seen.add(key)
                        results.append(_compile_variant(case, name, target, fn, args, launch))
                        if echo:
                            print(results[-1].line(), flush=True)
                        if on_result:
                            on_result(results)
    return results


def _compile_variant(case: str, name: str, target, fn, args: tuple, launch: dict) -> Result:
    result = Result(case, fn.__name__, name, _varying(launch), launch.get("num_warps", 4), launch.get("num_stages", 3))
    start = time.perf_counter()
    try:
        compiled, options, log = _compile(fn, args, launch, target)
        result.num_warps, result.num_stages = options["num_warps"], options["num_stages"]
        result.shared_bytes = compiled.metadata.shared
        for field, value in _resources(compiled, log).items():
            setattr(result, field, value)
    except Exception as err:  # reported; the other variants still compile
        result.error = _root_cause(err)
    from olmo_fast.kernels._tuning import SPILL_BUDGET_BYTES

    result.over_budget = (result.spill_bytes or 0) > SPILL_BUDGET_BYTES
    result.seconds = time.perf_counter() - start
    return result


def _root_cause(err: BaseException) -> str:
    """The innermost cause of a (nested) CompilationError, with where in which function it arose."""
    where = ""
    while err.__cause__ is not None:
        head = str(err).strip().splitlines()
        if head and head[0].startswith("at "):
            where = head[0].rstrip(":")
        err = err.__cause__
    lines = str(err).strip().splitlines()
    message = f"{type(err).__name__}: {lines[-1][:300]}" if lines else type(err).__name__
    return f"{message} ({where})" if where else message


def _args_key(args: tuple) -> str:
    """What of a launch's positional arguments changes the compiled code: tensor dtypes, the other values."""
    return repr(tuple(str(a.dtype) if hasattr(a, "dtype") else a for a in args))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m olmo_fast.benchmarks.compile_triton", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="sm_90,gfx90a", help=f"comma-separated, of {sorted(TARGETS)}")
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--first-config", action="store_true", help="only the first autotune config of each kernel")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":  # set by the test setup on CPUs: compile in a fresh process
        os.environ["TRITON_INTERPRET"] = "0"
        os.execv(sys.executable, [sys.executable, "-m", "olmo_fast.benchmarks.compile_triton",
                                  *(sys.argv[1:] if argv is None else argv)])
    targets = [t for t in args.targets.split(",") if t]
    bad = sorted(set(targets) - set(TARGETS))
    if bad:
        parser.error(f"unknown targets {bad}; known: {sorted(TARGETS)}")
    from olmo_fast.kernels._tuning import SPILL_BUDGET_BYTES

    def report(results: list[Result]) -> None:
        if args.json:
            _write_json(args.json, targets, args.dtype, results)

    results = compile_all(targets, [c for c in args.cases.split(",") if c] or None, args.dtype, args.first_config,
                          on_result=report)
    report(results)
    failed = [r for r in results if r.error]
    spilling = [r for r in results if r.over_budget]
    print(f"compiled {len(results) - len(failed)} of {len(results)} variants for {', '.join(targets)}"
          + (f"; {len(spilling)} spill over the budget of {SPILL_BUDGET_BYTES} B per thread" if spilling else ""))
    return 1 if failed or spilling else 0


def _write_json(path: str, targets: list[str], dtype: str, results: list[Result]) -> None:
    """The report as JSON, replaced atomically (a reader never sees half a file)."""
    import dataclasses

    import triton

    from olmo_fast.kernels._tuning import SPILL_BUDGET_BYTES

    from .report import save_json

    doc = {"targets": targets, "dtype": dtype, "triton": triton.__version__,
           "spill_budget_bytes": SPILL_BUDGET_BYTES, "failed": sum(r.error is not None for r in results),
           "over_budget": sum(r.over_budget for r in results),
           "variants": [dataclasses.asdict(r) for r in results]}
    save_json(doc, path)


if __name__ == "__main__":
    sys.exit(main())
