"""Timing: CUDA events on a GPU, `time.perf_counter` on the CPU; median and spread (p20/p80) of many runs.

`run(i)` executes one call on input set `i % n_sets`: the caller keeps several copies of the inputs so that a
small case does not find its data in cache from the previous call. On a GPU the L2 cache is also flushed
(a 256 MB memset, outside the timed interval) before every timed call, as `triton.testing.do_bench` does.
"""
from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

_FLUSH_BYTES = 256 * 2**20


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    n: int


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default) of a non-empty list."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(times_ms: list[float]) -> Timing:
    if not times_ms:
        raise ValueError("no timings to summarize")
    return Timing(quantile(times_ms, 0.5), quantile(times_ms, 0.2), quantile(times_ms, 0.8), len(times_ms))


def _counts(estimate_ms: float, warmup_ms: float, rep_ms: float, min_rep: int, max_rep: int) -> tuple[int, int]:
    est = max(estimate_ms, 1e-4)
    return max(1, int(warmup_ms / est)), max(min_rep, min(max_rep, int(rep_ms / est)))


def time_cuda(run: Callable[[int], object], n_sets: int = 1, warmup_ms: float = 25, rep_ms: float = 100,
              min_rep: int = 5, max_rep: int = 1000) -> Timing:
    """Median/p20/p80 of `run` on the current CUDA device, each call between two CUDA events, L2 flushed first."""
    flush = torch.empty(_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    run(0)
    torch.cuda.synchronize()
    start.record()
    for i in range(5):
        run(i % n_sets)
    end.record()
    torch.cuda.synchronize()
    n_warm, n_rep = _counts(start.elapsed_time(end) / 5, warmup_ms, rep_ms, min_rep, max_rep)
    for i in range(n_warm):
        run(i % n_sets)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_rep):
        flush.zero_()
        starts[i].record()
        run(i % n_sets)
        ends[i].record()
    torch.cuda.synchronize()
    return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)])


def l2_flush(device: torch.device) -> Callable[[], None]:
    """A call that evicts the GPU's L2 cache (a 256 MB memset) and waits for it, for timers that synchronize
    around each timed call; nothing on the CPU."""
    if device.type != "cuda":
        return lambda: None
    buffer = torch.empty(_FLUSH_BYTES, dtype=torch.int8, device=device)

    def flush() -> None:
        buffer.zero_()
        torch.cuda.synchronize(device)
    return flush


def time_cpu(run: Callable[[int], object], n_sets: int = 1, warmup_ms: float = 10, rep_ms: float = 50,
             min_rep: int = 3, max_rep: int = 20000) -> Timing:
    """Median/p20/p80 of `run` on the CPU by `time.perf_counter`."""
    return time_cpu_interleaved([run], n_sets, warmup_ms, rep_ms, min_rep, max_rep)[0]


def time_cpu_interleaved(runs: list[Callable[[int], object]], n_sets: int = 1, warmup_ms: float = 10,
                         rep_ms: float = 50, min_rep: int = 3, max_rep: int = 20000,
                         rounds: int = 8) -> list[Timing | Exception]:
    """`time_cpu` of several calls at once, their timed repetitions taken in `rounds` alternating rounds, so that
    a slow spell of a shared host (another tenant, a frequency change) falls on all of them alike and their
    ratio holds. The budget, not a small cap, sets the count: a 10 us call is timed 5000 times. A call that
    raises gets its exception in its place and leaves the rounds. The garbage collector is off meanwhile, as in
    `timeit`: a collection would land on whichever call happened to be running."""
    gc.collect()
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        return _interleaved(runs, n_sets, warmup_ms, rep_ms, min_rep, max_rep, rounds)
    finally:
        if gc_was_on:
            gc.enable()


def _warm_up(run: Callable[[int], object], n_sets: int, warmup_ms: float, rep_ms: float, min_rep: int,
             max_rep: int) -> int:
    """Runs `run` for `warmup_ms` (at least twice) and returns how many timed calls fit in `rep_ms`, estimated from
    the warm-up's calls after the first: a first call's one-time costs (a lazy import, a cold allocator) would
    make a 10 us call look like 20 ms and get it timed 3 times, in its cold phase."""
    run(0)
    calls, start = 0, time.perf_counter()
    while True:
        run(calls % n_sets)
        calls += 1
        elapsed_ms = (time.perf_counter() - start) * 1e3
        if elapsed_ms >= warmup_ms:
            return max(min_rep, min(max_rep, int(rep_ms / max(elapsed_ms / calls, 1e-4))))


def _interleaved(runs, n_sets, warmup_ms, rep_ms, min_rep, max_rep, rounds) -> list[Timing | Exception]:
    results: list[Timing | Exception | None] = [None] * len(runs)
    counts: dict[int, int] = {}
    for k, run in enumerate(runs):
        try:
            counts[k] = _warm_up(run, n_sets, warmup_ms, rep_ms, min_rep, max_rep)
        except Exception as exc:  # noqa: BLE001 - the caller records it as this call's row
            results[k] = exc
    times: dict[int, list[float]] = {k: [] for k in counts}
    for r in range(rounds):
        for k in list(times):
            if results[k] is not None:
                continue
            first, last = counts[k] * r // rounds, counts[k] * (r + 1) // rounds
            try:
                for i in range(first, last):
                    t0 = time.perf_counter()
                    runs[k](i % n_sets)
                    times[k].append((time.perf_counter() - t0) * 1e3)
            except Exception as exc:  # noqa: BLE001
                results[k] = exc
    return [result if result is not None else summarize(times[k]) for k, result in enumerate(results)]


def _budget(warmup_ms: float | None, rep_ms: float | None) -> dict[str, float]:
    return {k: v for k, v in (("warmup_ms", warmup_ms), ("rep_ms", rep_ms)) if v is not None}


def time_fn(run: Callable[[int], object], device: torch.device, n_sets: int = 1, warmup_ms: float | None = None,
            rep_ms: float | None = None) -> Timing:
    """`time_cuda` on a CUDA device, `time_cpu` otherwise (None: that timer's default budget)."""
    timer = time_cuda if device.type == "cuda" else time_cpu
    return timer(run, n_sets, **_budget(warmup_ms, rep_ms))


def time_all(runs: list[Callable[[int], object]], device: torch.device, n_sets: int = 1,
             warmup_ms: float | None = None, rep_ms: float | None = None) -> list[Timing | Exception]:
    """Each of `runs` timed: on the CPU interleaved (`time_cpu_interleaved`), on a GPU one after another (CUDA
    events are steady); a call that raises gets its exception in its place."""
    if device.type != "cuda":
        return time_cpu_interleaved(runs, n_sets, **_budget(warmup_ms, rep_ms))
    results: list[Timing | Exception] = []
    for run in runs:
        try:
            results.append(time_cuda(run, n_sets, **_budget(warmup_ms, rep_ms)))
        except Exception as exc:  # noqa: BLE001 - the caller records it as this call's row
            results.append(exc)
    return results


def peak_memory_mb(run: Callable[[], object], device: torch.device) -> float | None:
    """Extra device memory one call needs at its peak (torch.cuda.max_memory_allocated delta); None on the CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20
