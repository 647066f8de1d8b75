"""pytest-benchmark front end of the suite: `pytest benchmarks/ --benchmark-only` (from the repository root).

One test per (case, provider, mode) of `cases.shape_set` x `providers.registry()` x `cases.modes`, with the
suite's defaults: OLMo-7B shapes in bf16 on a GPU, the tiny odd `cpu-small` shapes in fp32 (one thread) on the
CPU. Options (`pytest benchmarks/ --help`, "olmo-fast benchmarks"): --bench-device, --bench-shapes,
--bench-dtype, --bench-providers, --bench-threads, --bench-interpreted. On the CPU our Triton kernels run only
under the interpreter, a plumbing check ~2000x slower than a kernel (`report.INTERPRETED`): those tests are
marked `interpreted` and skipped unless --bench-interpreted is given; torch.compile is skipped there too unless
--bench-providers names it (it compiles for seconds per shape).
"""
from __future__ import annotations

import os
import re

import pytest
import torch

if not torch.cuda.is_available():  # Triton on a CPU: its interpreter, set before Triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from . import ceilings, report, suite  # noqa: E402 - after TRITON_INTERPRET
from .cases import DTYPES, SHAPE_SETS, Case, modes, shape_set  # noqa: E402
from .providers import registry  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("olmo-fast benchmarks")
    group.addoption("--bench-device", help="cuda, cuda:1, cpu (default: cuda if available)")
    group.addoption("--bench-shapes", choices=SHAPE_SETS,
                    help="shape set (default: olmo-7b on a GPU, cpu-small on the CPU)")
    group.addoption("--bench-dtype", choices=sorted(DTYPES), help="default: bf16 on a GPU, fp32 on the CPU")
    group.addoption("--bench-providers", help="comma-separated providers to run (default: all that can run here; "
                                              "on the CPU all but torch-compile)")
    group.addoption("--bench-threads", type=int, help="CPU threads for torch (default on the CPU: 1)")
    group.addoption("--bench-interpreted", action="store_true",
                    help="on the CPU, also run our Triton kernels under the interpreter (a plumbing check)")


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.hasplugin("benchmark"):
        raise pytest.UsageError("benchmarks/ needs pytest-benchmark: pip install 'pytest-benchmark>=4,<6' "
                                "(or the test extra: pip install -e '.[test]')")
    config.addinivalue_line("markers", f"interpreted: our Triton kernels on a CPU ({report.INTERPRETED}); "
                                       "skipped unless --bench-interpreted")
    # Threads set before pytest-benchmark reads the machine info (the suite's environment includes them).
    # On the CPU one by default: steady timings on a shared machine (as `olmo-fast bench`).
    threads = config.getoption("bench_threads")
    if threads or bench_device(config).type == "cpu":
        torch.set_num_threads(threads or 1)


def bench_device(config: pytest.Config) -> torch.device:
    name = config.getoption("bench_device")
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise pytest.UsageError(f"--bench-device {name!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--bench-device {name!r}: no CUDA device here")
    return device


def bench_dtype(config: pytest.Config) -> torch.dtype:
    return DTYPES[config.getoption("bench_dtype") or ("bf16" if bench_device(config).type == "cuda" else "fp32")]


def _providers_named(config: pytest.Config) -> set[str] | None:
    text = config.getoption("bench_providers")
    if text is None:
        return None
    named = {name.strip() for name in text.split(",") if name.strip()}
    known = {p.name for plist in registry().values() for p in plist}
    if named - known:
        raise pytest.UsageError(f"--bench-providers: unknown {sorted(named - known)}; choose from {sorted(known)}")
    return named


def _test_id(case: Case, provider: str, mode: str) -> str:
    """`-k`-friendly: 'swiglu-67x192to96-eager-fwd', 'attention-B1_T33_H4_2_D16-ours-cpp-fwd+bwd'."""
    return "-".join((case.op, re.sub(r"[^\w.+]+", "_", case.label.replace("->", "to")), provider, mode))


def _marks(config: pytest.Config, provider: str, named: set[str] | None) -> list:
    """Why this provider does not run by default on this device, as marks (none where it runs)."""
    if named is not None:
        return [] if provider in named else [pytest.mark.skip(reason="not selected (--bench-providers)")]
    if bench_device(config).type != "cpu":
        return []
    if provider.split("[")[0] == "ours-triton":  # and its attention variants, ours-triton[<variant>]
        skip = [] if config.getoption("bench_interpreted") else [pytest.mark.skip(
            reason=f"{report.INTERPRETED} (--bench-interpreted runs it)")]
        return [pytest.mark.interpreted, *skip]
    if provider in suite.CPU_DESELECTED:
        return [pytest.mark.skip(reason=suite.CPU_DESELECTED[provider].replace("--providers", "--bench-providers"))]
    return []


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize a test taking `bench_case`, `provider` and `mode` over the shape set, the registry and the
    op's modes (the suite's own tables)."""
    if not {"bench_case", "provider", "mode"} <= set(metafunc.fixturenames):
        return
    config = metafunc.config
    device = bench_device(config)
    shapes = config.getoption("bench_shapes") or ("olmo-7b" if device.type == "cuda" else "cpu-small")
    named = _providers_named(config)
    params = [pytest.param(case, provider, mode, id=_test_id(case, provider.name, mode),
                           marks=_marks(config, provider.name, named))
              for case in shape_set(shapes) for provider in registry()[case.op] for mode in modes(case.op)]
    metafunc.parametrize(("bench_case", "provider", "mode"), params)


@pytest.fixture(scope="session")
def device(pytestconfig: pytest.Config) -> torch.device:
    device = bench_device(pytestconfig)
    named = _providers_named(pytestconfig)
    if device.type == "cuda" if named is None else "torch-compile" in named:
        suite.raise_recompile_limits()
    return device


@pytest.fixture(scope="session")
def dtype(pytestconfig: pytest.Config) -> torch.dtype:
    return bench_dtype(pytestconfig)


@pytest.fixture(scope="session")
def peaks(device: torch.device) -> dict:
    """The card's copy bandwidth and matmul FLOP/s, measured once per session (`ceilings.measure`)."""
    return ceilings.measure(device)


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """The suite's environment (card, torch/triton/CUDA versions, threads) in the JSON's machine_info; without
    the date and git state, which the JSON holds elsewhere (datetime, commit_info) and which would make every
    --benchmark-compare warn of another machine."""
    env = suite.environment(bench_device(config))
    machine_info["olmo_fast"] = {k: v for k, v in env.items() if k not in ("date", "git_commit", "git_dirty")}

