"""The pytest-benchmark front end (`pytest benchmarks/ --benchmark-only`, benchmarks/conftest.py + test_ops.py):
a CPU run of a few cpu-small cases writes pytest-benchmark JSON whose extra_info scores match hand-computed
bytes/FLOPs at the measured median, interpreted Triton is skipped with its reason, and a second run compares
against the first one saved; a provider computing another function fails its test, one that cannot run is skipped."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

needs_plugin = pytest.mark.skipif(importlib.util.find_spec("pytest_benchmark") is None,
                                  reason="needs pytest-benchmark (the test extra)")
ROOT = Path(__file__).resolve().parent.parent
# swiglu 67 x [96 | 96] -> 96 in fp32 (cases.shape_set("cpu-small")): fwd reads [x | gate] and writes out,
# bwd reads dout and [x | gate] and writes [dx | dgate] (roofline.swiglu_bytes).
SWIGLU_FWD, SWIGLU_BWD = 3 * 67 * 96 * 4, 5 * 67 * 96 * 4
# causal attention B1 T33 H4 D16: 4 * B * T * T * H * D / 2 (FlashAttention's count).
ATTENTION_FWD = 4 * 1 * 33 * 33 * 4 * 16 / 2
SELECTION = "swiglu-67x192to96 and (eager or ours-triton) or B1_T33_H4_2_D16-eager-fwd and not bwd"


# Loaded with -p before benchmarks/conftest.py: adds to swiglu a provider computing another function and one that
# cannot run here.
EXTRA_PROVIDERS = """
from benchmarks import providers

_registry = providers.registry


def _absent(case, device):
    raise providers.Unavailable("not on this machine")


def registry():
    table = _registry()
    wrong = lambda case, device: providers.Impl(lambda h: providers.op_fn(case, "torch")(h) + 1.0)
    table["swiglu"] += [providers.Provider("wrong", wrong), providers.Provider("absent", _absent)]
    return table


providers.registry = registry
"""


def _pytest_bench(tmp_path: Path, *args: str, selection: str = SELECTION, code: int = 0) -> subprocess.CompletedProcess:
    """`pytest <repo>/benchmarks --benchmark-only` on a few CPU cases, run from `tmp_path` (pytest-benchmark 5.3
    fails to name a storage folder outside the working directory when it warns of another machine)."""
    cmd = [sys.executable, "-m", "pytest", str(ROOT / "benchmarks"), "--benchmark-only", "--bench-device", "cpu",
           "-k", selection, "-p", "no:cacheprovider", "-rs", "--benchmark-max-time=0.02", "--benchmark-min-rounds=3",
           "--benchmark-storage=storage", *args]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == code, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@needs_plugin
def test_cpu_run_writes_json_with_scores_and_compares(tmp_path):
    out = tmp_path / "bench.json"
    first = _pytest_bench(tmp_path, f"--benchmark-json={out}", "--benchmark-save=base")
    assert "Triton interpreter: a plumbing check, not a speed (--bench-interpreted runs it)" in first.stdout
    data = json.loads(out.read_text())
    rows = {b["name"]: b for b in data["benchmarks"]}
    assert sorted(rows) == sorted(f"test_op[{name}]" for name in (
        "swiglu-67x192to96-eager-fwd", "swiglu-67x192to96-eager-bwd", "swiglu-67x192to96-eager-fwd+bwd",
        "attention-B1_T33_H4_2_D16-eager-fwd"))
    expected = {"fwd": SWIGLU_FWD, "bwd": SWIGLU_BWD, "fwd+bwd": SWIGLU_FWD + SWIGLU_BWD}
    for row in rows.values():
        info, median = row["extra_info"], row["stats"]["median"]
        assert row["stats"]["rounds"] >= 3 and median > 0
        assert info["provider"] == "eager" and info["dtype"] == "float32" and info["check_err"] <= 1e-3
        assert row["group"] == f"{info['op']} {info['shape']} {info['mode']}"
        assert info["copy_gbps"] > 0 and info["matmul_tflops"] > 0
        if info["op"] == "swiglu":
            assert info["bytes"] == expected[info["mode"]] and info["flops"] is None and info["tflops"] is None
            assert info["gbps"] == pytest.approx(info["bytes"] / median / 1e9, rel=1e-9)
            assert info["pct_copy_bw"] == pytest.approx(100 * info["gbps"] / info["copy_gbps"], rel=1e-9)
        else:
            assert info["flops"] == ATTENTION_FWD and info["bytes"] is None and info["gbps"] is None
            assert info["tflops"] == pytest.approx(ATTENTION_FWD / median / 1e12, rel=1e-9)
            assert info["pct_matmul"] == pytest.approx(100 * info["tflops"] / info["matmul_tflops"], rel=1e-9)
    assert data["machine_info"]["olmo_fast"]["device"] == "cpu"
    saved = list((tmp_path / "storage").rglob("0001_base.json"))
    assert len(saved) == 1

    second = _pytest_bench(tmp_path, "--benchmark-compare=0001", "--benchmark-compare-fail=median:1000000%")
    assert "0001_base" in second.stdout and "(NOW)" in second.stdout
    assert "test_op[swiglu-67x192to96-eager-fwd] (0001_base)" in second.stdout


@needs_plugin
def test_a_provider_computing_another_function_fails_and_one_that_cannot_run_is_skipped(tmp_path, monkeypatch):
    (tmp_path / "extra_providers.py").write_text(EXTRA_PROVIDERS)
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{tmp_path}")
    done = _pytest_bench(tmp_path, "-p", "extra_providers",
                         selection="swiglu-67x192to96 and (wrong or absent) and not bwd", code=1)
    assert "1 failed, 1 skipped" in done.stdout
    assert "test_op[swiglu-67x192to96-wrong-fwd]" in done.stdout  # the failure's header
    assert "wrong swiglu 67x192->96 fwd: error " in done.stdout
    assert "relative to eager's largest magnitude > 0.001" in done.stdout
    assert "SKIPPED" in done.stdout and "unavailable: not on this machine" in done.stdout
