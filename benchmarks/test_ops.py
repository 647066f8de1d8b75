"""The suite's microbenchmarks as pytest-benchmark tests (parametrized in `conftest.py`): one per (case,
provider, mode).

Each test builds the provider (one that cannot run here - not installed, CUDA only, no kernel for this device -
is skipped with its reason), checks its output (and, for a backward mode, its input gradients) once against
eager on the same inputs with the suite's sanity bound (`suite.CHECK_TOL`; a mismatch fails the test), then
times `suite.runner` with `benchmark.pedantic`. Every round runs on the next of the suite's input copies; on a
GPU the L2 is flushed before it (untimed) and the timed call ends with a synchronize, so a round is the
kernel's wall time including its launch (`olmo-fast bench` times between CUDA events instead). Rounds: as many
as fit in --benchmark-max-time (at least --benchmark-min-rounds, at most MAX_ROUNDS), after a tenth as many
warm-up rounds. `extra_info` carries the suite's scores at the median time: bytes / FLOPs (`roofline.work`),
GB/s or TFLOP/s, and their percentage of the copy bandwidth / matmul FLOP/s measured in the same session.
"""
from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterator

import pytest
import torch

from . import roofline, suite, timing
from .cases import Case
from .providers import Provider

MAX_ROUNDS = 1000


def _rounds(config: pytest.Config, call_s: float) -> tuple[int, int]:
    """(rounds, warm-up rounds) for a call taking about `call_s` seconds, by pytest-benchmark's options."""
    fit = int(float(config.getoption("benchmark_max_time")) / max(call_s, 1e-7))
    rounds = max(int(config.getoption("benchmark_min_rounds")), min(MAX_ROUNDS, fit))
    return rounds, max(1, rounds // 10)


@contextlib.contextmanager
def _skipped_if_unavailable() -> Iterator[None]:
    """A provider that cannot run here (not installed, CUDA only, no kernel for this device) skips the test with
    the suite's reason; any other failure fails it."""
    try:
        yield
    except Exception as exc:
        status, reason = suite.failure_status(exc)
        if status == "error":
            raise
        pytest.skip(f"{status}: {reason}")


def test_op(benchmark, pytestconfig: pytest.Config, bench_case: Case, provider: Provider, mode: str,
            device: torch.device, dtype: torch.dtype, peaks: dict) -> None:
    with _skipped_if_unavailable():
        impl = provider.build(bench_case, device)
    sets = suite.input_sets(bench_case, dtype, device)
    reference, grads = suite.references(bench_case, sets[0], backward=mode != "fwd")
    with _skipped_if_unavailable():  # a backend without a kernel for this device says so at its first call
        err = suite.forward_error(impl, bench_case, sets[0], reference)
    if grads is not None:
        err = max(err, suite.grad_error(impl, bench_case, sets[0], grads))
    tol = suite.CHECK_TOL[dtype]
    assert err <= tol, (f"{provider.name} {bench_case.op} {bench_case.label} {mode}: error {err:.3g} relative to "
                        f"eager's largest magnitude > {tol:g} (nan: a NaN)")

    run = suite.runner(impl, bench_case, sets, mode)
    flush = timing.l2_flush(device)
    rounds_done = itertools.count()

    def setup() -> tuple[tuple[int], dict]:
        flush()
        return (next(rounds_done) % len(sets),), {}

    def call(i: int) -> None:
        run(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    call(*setup()[0])  # the first call: a kernel's compile (and autotuning), untimed
    args = setup()[0]
    start = time.perf_counter()
    call(*args)  # the estimate of one call
    rounds, warmup_rounds = _rounds(pytestconfig, time.perf_counter() - start)
    benchmark.group = f"{bench_case.op} {bench_case.label} {mode}"
    benchmark.pedantic(call, setup=setup, rounds=rounds, warmup_rounds=warmup_rounds)
    benchmark.extra_info.update(
        op=bench_case.op, shape=bench_case.label, size=bench_case.size, variant=bench_case.variant, mode=mode,
        dtype=str(dtype).removeprefix("torch."), provider=provider.name, note=impl.note, check_err=err,
        copy_gbps=peaks["copy_gbps"], matmul_tflops=peaks["matmul_tflops"])
    if benchmark.stats is not None:  # None under --benchmark-disable (one plain call)
        median_s = benchmark.stats.stats.median
        benchmark.extra_info.update(roofline.rates(bench_case.op, bench_case.params, dtype.itemsize, mode, median_s,
                                                   peaks))
