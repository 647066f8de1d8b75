"""The benchmark loop: for each case, each provider and each mode, check the output against eager, time it,
and score it against the op's least work (`roofline.py`) and the ceilings measured in the same run. On the CPU
a case's providers are timed together for each mode, their repetitions in alternating rounds, so that the
ratios hold on a shared, noisy host; on a GPU one after another.

Each (case, provider, mode) gives one row; a provider that cannot run gives rows saying why ("not installed",
"unavailable: <reason>", "error: <message>"), never silence. Once a case's providers have run, our rows get
their speed-ups over eager and over SDPA measured in that same run (`report.add_speedups`), which the terminal
table lists at its end. With an output folder, bench.json (and bench.csv) are
rewritten atomically after every row, so a run cut short (a timeout, SIGINT, SIGTERM, even SIGKILL) leaves valid
files holding every row measured; `state` says whether the run was complete, interrupted, or cut short
("running"). SIGINT/SIGTERM stop the run (see `interrupt.py`); the caller exits 130.
"""
from __future__ import annotations

import contextlib
import datetime
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from olmo_fast.ops import BackendError

from . import ceilings, interrupt, report, roofline
from .cases import DTYPES, OPS, Case, differentiable, make_inputs, modes, shape_set
from .providers import Impl, NotInstalled, Unavailable, op_fn, registry
from .timing import peak_memory_mb, time_all

# Sanity bound for the output check (relative to the reference's largest magnitude): it catches a provider
# computing another function (a layout mix-up), not precision - the kernel tests judge that.
CHECK_TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}
CPU_DESELECTED = {"torch-compile": "not selected: compiling costs seconds per shape on a CPU (name it in "
                                   "--providers to include it)"}
# On a CPU, Triton runs under its interpreter (a plumbing check, not a speed): by default only on the small
# cases (the model-like ones of cpu-small would take it minutes a case).
INTERPRETED_MAX_SIZE = 128
EXPENSIVE, SOFT_BUDGET = {"torch-compile"}, 0.6
N_OUTPUTS = {"layer_norm": None, "swiglu": 1, "rope": 2, "qkv_rope": 3, "qk_norm_rope": 3, "attention": 1,
             "decode_attention": 1, "linear_cross_entropy": 1}


def environment(device: torch.device) -> dict:
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(sm_count=props.multi_processor_count, l2_bytes=getattr(props, "L2_cache_size", None),
                   memory_gb=round(props.total_memory / 2**30, 1))
    env.update(_git())
    return env


def _git() -> dict:
    root = Path(__file__).resolve().parent.parent
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, timeout=10)  # noqa: E731
        commit = run("rev-parse", "HEAD")
        if commit.returncode == 0:
            return {"git_commit": commit.stdout.strip(), "git_dirty": bool(run("status", "--porcelain").stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"git_commit": os.environ.get("OLMO_FAST_COMMIT", "unknown"), "git_dirty": None}


def _flat(out: Any, n: int | None) -> list[torch.Tensor]:
    tensors = [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)]
    return tensors if n is None else tensors[:n]


def _n_outputs(case: Case) -> int:
    return N_OUTPUTS[case.op] or (2 if case.params["residual"] else 1)


def check_error(out: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """Largest |out - ref| over the reference's largest magnitude, across outputs (nan if any is nan)."""
    if len(out) != len(ref):
        raise ValueError(f"{len(out)} outputs where the reference has {len(ref)}")
    worst = 0.0
    for o, r in zip(out, ref):
        if o.shape != r.shape:
            raise ValueError(f"output shape {tuple(o.shape)} where the reference has {tuple(r.shape)}")
        err = ((o.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-6)).item()
        worst = err if math.isnan(err) else max(worst, err)
        if math.isnan(worst):
            break
    return worst


def _args(impl: Impl, case: Case, inputs: tuple, grad: bool) -> tuple[list, list[torch.Tensor]]:
    """The provider's arguments made from our inputs, and (with `grad`, as fresh leaves) the ones its backward
    differentiates."""
    args = list(impl.prepare(*inputs) if impl.prepare else inputs)
    idx = impl.grad_idx if impl.grad_idx is not None else differentiable(case.op, case.params)
    if grad:
        for j in idx:
            args[j] = args[j].detach().requires_grad_(True)
    return args, [args[j] for j in idx]


def runner(impl: Impl, case: Case, sets: list[tuple], mode: str) -> Callable[[int], Any]:
    """`run(i)`: one `mode` call on input set i (graphs for `bwd` are built here, untimed)."""
    n_out = _n_outputs(case)
    staged = [_args(impl, case, inputs, mode != "fwd") for inputs in sets]
    fn = impl.fn
    if mode == "fwd":
        def run(i):
            with torch.no_grad():
                return fn(*staged[i][0])
        return run
    grads, graphs = [], []
    for args, _leaves in staged:
        outs = _flat(fn(*args), n_out)
        grads.append([torch.randn_like(o) for o in outs])
        graphs.append(outs if mode == "bwd" else None)
    if mode == "bwd":
        return lambda i: torch.autograd.grad(graphs[i], staged[i][1], grads[i], retain_graph=True)
    return lambda i: torch.autograd.grad(_flat(fn(*staged[i][0]), n_out), staged[i][1], grads[i])


def _n_sets(inputs: tuple, device: torch.device) -> int:
    """Enough input copies to overflow the last-level cache twice (at most 4)."""
    footprint = sum(t.numel() * t.element_size() for t in inputs)
    cache = (getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 * 2**20
             if device.type == "cuda" else 32 * 2**20)
    return max(1, min(4, math.ceil(2 * cache / max(footprint, 1))))


def input_sets(case: Case, dtype: torch.dtype, device: torch.device) -> list[tuple]:
    """Fresh random inputs of `case`, in enough copies that a timed call does not find its data in cache."""
    sets = [make_inputs(case.op, case.params, dtype, device)]
    return sets + [make_inputs(case.op, case.params, dtype, device) for _ in range(_n_sets(sets[0], device) - 1)]


def references(case: Case, inputs: tuple, backward: bool) -> tuple[list[torch.Tensor], tuple | None]:
    """Eager's outputs on `inputs` and, with `backward`, (random output gradients, eager's input gradients)."""
    n_out = _n_outputs(case)
    with torch.no_grad():
        reference = _flat(op_fn(case, "torch")(*inputs), n_out)
    if not backward:
        return reference, None
    diff = differentiable(case.op, case.params)
    leaves = [t.clone().requires_grad_(i in diff) for i, t in enumerate(inputs)]
    outs = _flat(op_fn(case, "torch")(*leaves), n_out)
    grad_outs = [torch.randn_like(o) for o in outs]
    return reference, (grad_outs, list(torch.autograd.grad(outs, [leaves[i] for i in diff], grad_outs)))


def _outputs(impl: Impl, case: Case, inputs: tuple, grad: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The provider's outputs in our layout, on fresh copies of `inputs`; with `grad`, also its argument leaves
    (the ones the backward differentiates)."""
    args, leaves = _args(impl, case, tuple(t.clone() for t in inputs), grad)
    with torch.set_grad_enabled(grad):
        out = impl.fn(*args)
    return _flat(impl.post(out) if impl.post else out, _n_outputs(case)), leaves


def forward_error(impl: Impl, case: Case, inputs: tuple, reference: list[torch.Tensor]) -> float:
    """`check_error` of the provider's outputs against eager's (`references`)."""
    with torch.no_grad():
        return check_error(_outputs(impl, case, inputs, grad=False)[0], reference)


def grad_error(impl: Impl, case: Case, inputs: tuple, grads: tuple) -> float:
    """Error of the provider's input gradients (for eager's random output gradients) against eager's."""
    grad_outs, reference = grads
    outs, leaves = _outputs(impl, case, inputs, grad=True)
    got = list(torch.autograd.grad(outs, leaves, grad_outs))
    return check_error(impl.grad_post(got) if impl.grad_post else got, reference)


def failure_status(err: BaseException) -> tuple[str, str]:
    """(status, reason) of a provider that raised: "not installed" / "unavailable" (it cannot run here: no
    library, no kernel for this device) or "error" (it should have run)."""
    text = f"{type(err).__name__}: {err}".strip().splitlines()[0][:300] if str(err) else type(err).__name__
    if isinstance(err, Unavailable):
        return ("not installed" if isinstance(err, NotInstalled) else "unavailable"), str(err)
    if isinstance(err, BackendError) or "No available kernel" in str(err):
        return "unavailable", str(err).splitlines()[0][:300]
    return "error", text


class Suite:
    def __init__(self, device: torch.device, dtype: torch.dtype, providers: set[str] | None,
                 warmup_ms: float | None, rep_ms: float | None, budget_s: float | None, log=print,
                 on_row: Callable[[], None] = lambda: None) -> None:
        self.device, self.dtype, self.providers = device, dtype, providers
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms
        now = time.monotonic()
        self.deadline = None if budget_s is None else now + budget_s
        # Past this point the expensive providers (compilers) are skipped, leaving the rest of the budget to the
        # cheap ones of the cases still to come.
        self.soft_deadline = None if budget_s is None else now + SOFT_BUDGET * budget_s
        self.log, self.on_row = log, on_row  # on_row: called after each row is added (writes the results)
        self.stop_check: Callable[[], None] = lambda: None  # raises KeyboardInterrupt once a signal has come
        self.ceilings: dict = {}
        self.rows: list[dict] = []

    def selected(self, name: str, case: Case) -> str | None:
        """None if `name` runs on `case`, else why not."""
        if self.providers is not None:
            return None if name in self.providers else "not selected (--providers)"
        if self.device.type != "cpu":
            return None
        if name.startswith("ours-triton") and case.size > INTERPRETED_MAX_SIZE:
            return (f"not selected: the Triton interpreter on a CPU case of size > {INTERPRETED_MAX_SIZE} (name it "
                    f"in --providers to include it)")
        return CPU_DESELECTED.get(name)

    def row(self, case: Case, mode: str, provider: str, status: str, reason: str = "", **extra) -> dict:
        row = {"op": case.op, "shape": case.label, "size": case.size, "variant": case.variant, "mode": mode,
               "dtype": str(self.dtype).removeprefix("torch."), "provider": provider, "status": status,
               "reason": reason, **extra}
        self.rows.append(row)
        self.on_row()
        self.stop_check()
        return row

    def run_case(self, case: Case, modes_wanted: tuple[str, ...]) -> None:
        case_modes = [m for m in modes(case.op) if m in modes_wanted]
        if not case_modes:
            return
        sets = input_sets(case, self.dtype, self.device)
        reference, grads = references(case, sets[0], backward=any(m != "fwd" for m in case_modes))
        first_row = len(self.rows)
        ready: list[tuple[str, Impl, dict[str, tuple[float, str]]]] = []  # (name, impl, mode -> (error, check))
        for provider in registry()[case.op]:
            why_not = self.selected(provider.name, case)
            if why_not is None and self.deadline is not None:
                now = time.monotonic()
                if now > self.deadline:
                    why_not = "time budget (--budget-s) spent"
                elif provider.name in EXPENSIVE and now > self.soft_deadline:
                    why_not = f"time budget (--budget-s): {100 * SOFT_BUDGET:.0f}% spent, compilers skipped"
            if why_not is not None:
                for mode in case_modes:
                    self.row(case, mode, provider.name, "skipped", why_not)
                continue
            checked = self._check_provider(case, provider, case_modes, sets, reference, grads)
            if checked is None:
                continue
            if self.interleaves():
                ready.append(checked)
            else:  # timed at once: a later provider that hangs or dies costs none of these rows
                for mode in case_modes:
                    self._time(case, mode, [checked], sets)
        for mode in case_modes:
            for batch in self._batches(ready):
                self._time(case, mode, batch, sets)
        report.add_speedups(self.rows[first_row:])  # ours against eager and SDPA, all from this case's run
        self.on_row()
        del sets, reference, grads
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def interleaves(self) -> bool:
        """Whether a case's providers are timed together once all are checked (the CPU: their ratios survive a
        noisy host) or each as soon as it is checked (a GPU, whose CUDA-event times are steady: a provider that
        hangs in a slot's last minutes - a compiler - then costs none of the rows measured before it, and only one
        provider's graphs are held at a time)."""
        return self.device.type == "cpu"

    @staticmethod
    def _batches(ready: list) -> list[list]:
        """The providers timed together: a mode's compiled ones, their repetitions interleaved (timing.time_all);
        the interpreted Triton ones alone (the interpreter's garbage would slow the call timed after it)."""
        compiled = [entry for entry in ready if entry[1].note != report.INTERPRETED]
        return ([compiled] if compiled else []) + [[entry] for entry in ready if entry[1].note == report.INTERPRETED]

    def _check_provider(self, case, provider, case_modes, sets, reference, grads):
        """(name, impl, mode -> (worst error, check)) of a provider that built and ran; else its rows say why."""
        try:
            impl = provider.build(case, self.device)
            err = forward_error(impl, case, sets[0], reference)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a row, the run goes on
            status, reason = failure_status(exc)
            for mode in case_modes:
                self.row(case, mode, provider.name, status, reason)
            self.log(f"  {case.op:<16} {case.label:<28} {provider.name:<15} {status}: {reason}")
            return None
        grad_err = None
        if grads is not None:
            with contextlib.suppress(Exception):  # the backward's own failure is recorded by its timed rows
                grad_err = grad_error(impl, case, sets[0], grads)
        tol = CHECK_TOL[self.dtype]
        checks = {}
        for mode in case_modes:
            worst = err if mode == "fwd" or grad_err is None else max(err, grad_err)
            check = "ok" if worst <= tol else "MISMATCH"  # nan fails too
            if mode != "fwd" and grad_err is None:
                check += " (forward only)"
            checks[mode] = (worst, check)
        return provider.name, impl, checks

    def _time(self, case, mode, batch, sets) -> None:
        """Times `mode` for each (name, impl, checks) of `batch` together; a row for each, measured or failed."""
        runs = {}
        for name, impl, _checks in batch:
            try:
                runs[name] = runner(impl, case, sets, mode)
            except Exception as exc:  # noqa: BLE001
                self._failed(case, mode, name, impl, exc)
        timings = dict(zip(runs, time_all(list(runs.values()), self.device, len(sets), self.warmup_ms,
                                          self.rep_ms)))
        for name, impl, checks in batch:
            if name not in timings:
                continue
            timing = timings[name]
            if isinstance(timing, Exception):
                self._failed(case, mode, name, impl, timing)
                continue
            try:
                peak = peak_memory_mb(lambda run=runs[name]: run(0), self.device)
            except Exception as exc:  # noqa: BLE001
                self._failed(case, mode, name, impl, exc)
                continue
            err, check = checks[mode]
            scores = roofline.rates(case.op, case.params, self.dtype.itemsize, mode, timing.median_ms * 1e-3,
                                    self.ceilings)
            row = self.row(case, mode, name, "ok", note=impl.note, median_ms=timing.median_ms,
                           p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, n=timing.n, **scores, peak_mem_mb=peak,
                           check_err=err, check=check)
            self.log(f"  {case.op:<16} {case.label:<28} {name:<15} {mode:<8} {report.rate(row)}")

    def _failed(self, case, mode, name, impl, exc) -> None:
        status, reason = failure_status(exc)
        self.row(case, mode, name, status, reason, note=impl.note)
        self.log(f"  {case.op:<16} {case.label:<28} {name:<15} {mode:<8} {status}: {reason}")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def run(ops_wanted: list[str], shapes: str, modes_wanted: list[str], dtype: str, device: torch.device,
        providers: list[str] | None = None, out_dir: str | Path | None = None, warmup_ms: float | None = None,
        rep_ms: float | None = None, budget_s: float | None = None, plots: bool = True, log=print) -> dict:
    """Run the suite; returns (and, with `out_dir`, writes) the results: env, settings, ceilings, rows."""
    unknown = sorted(set(ops_wanted) - set(OPS))
    if unknown:
        raise ValueError(f"unknown ops {unknown}; choose from {OPS}")
    bad_modes = sorted(set(modes_wanted) - set(roofline.MODES))
    if bad_modes:
        raise ValueError(f"unknown modes {bad_modes}; choose from {roofline.MODES}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
    if providers is not None:
        known = {p.name for plist in registry().values() for p in plist}
        if set(providers) - known:
            raise ValueError(f"unknown providers {sorted(set(providers) - known)}; choose from {sorted(known)}")
        if "torch-compile" in providers:
            raise_recompile_limits()
    elif device.type == "cuda":
        raise_recompile_limits()
    cases = [c for c in shape_set(shapes) if c.op in ops_wanted]
    cases.sort(key=lambda c: ops_wanted.index(c.op))
    results: dict = {"schema": 1, "env": environment(device),
                     "settings": {"ops": ops_wanted, "shapes": shapes, "modes": modes_wanted, "dtype": dtype,
                                  "providers": providers, "warmup_ms": warmup_ms, "rep_ms": rep_ms,
                                  "budget_s": budget_s},
                     "state": "running", "ceilings": {}, "rows": []}
    save = (lambda: None) if out_dir is None else (lambda: report.write(results, out_dir, plots=False))
    suite = Suite(device, DTYPES[dtype], None if providers is None else set(providers), warmup_ms, rep_ms,
                  budget_s, log, on_row=save)
    results["rows"] = suite.rows
    save()  # a valid (empty) file from the start
    with interrupt.recording(results, save) as suite.stop_check:
        log(f"device: {results['env']['card']} ({device.type}); measuring ceilings ...")
        suite.ceilings = results["ceilings"] = ceilings.measure(device, warmup_ms, rep_ms)
        log(f"  copy {suite.ceilings['copy_gbps']:.1f} GB/s, {suite.ceilings['matmul_dtype']} matmul "
            f"{suite.ceilings['matmul_tflops']:.2f} TFLOP/s")
        save()
        for case in cases:
            suite.run_case(case, tuple(modes_wanted))
    if out_dir is not None:
        report.write(results, out_dir, plots=plots, log=log)
    return results


def raise_recompile_limits() -> None:
    """One compiled function per case, each at static shapes: let dynamo keep them all."""
    import torch._dynamo

    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
