"""`python -m olmo_fast.benchmarks.compile_triton`: the offline GPU compile check (one small kernel on sm_90 and
gfx90a, its JSON report and spill budget, attention's tensor-core instructions), and the autotune prune and compile
guard of `kernels/_tuning.py` that keep each target's configs compiling without heavy spills.

Run as the user would, with TRITON_INTERPRET=1 as conftest sets it on CPUs (the tool re-runs itself without the
interpreter): SwiGLU's forward at OLMo-7B's width compiles through ptxas, whose report gives the registers
(none spilled), with the 16 warps `_launch.num_warps` picks for a 4096-element block on 32-lane warps.
A few seconds on a CPU; no GPU needed.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_compile_triton_reports_registers_for_sm90():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "olmo_fast.benchmarks.compile_triton", "--targets", "sm_90",
                           "--cases", "swiglu_fwd"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == "compiled 1 of 1 variants for sm_90", done.stdout
    (line,) = lines[:-1]
    found = re.fullmatch(r"swiglu_fwd/_silu_mul_fwd_kernel +sm_90 +BLOCK=4096 +w16 +s\d +regs=(\d+) spill=(\d+)B "
                         r"smem=\d+B +[\d.]+s", line)
    assert found, line
    assert 0 < int(found.group(1)) <= 255 and found.group(2) == "0", line


def test_json_report_and_spill_budget(tmp_path):
    """`--json` writes every variant with registers, spills, shared memory and instruction counts (PTX for sm_90,
    amdgcn for gfx90a); a spill budget below zero makes every variant over budget: exit status 1, flagged."""
    report = tmp_path / "report.json"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    args = ["--targets", "sm_90,gfx90a", "--cases", "swiglu_fwd", "--json", str(report)]
    done = subprocess.run([sys.executable, "-m", "olmo_fast.benchmarks.compile_triton", *args], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    doc = json.loads(report.read_text())
    assert doc["targets"] == ["sm_90", "gfx90a"] and doc["failed"] == doc["over_budget"] == 0
    nvidia, amd = doc["variants"]
    assert (nvidia["target"], amd["target"]) == ("sm_90", "gfx90a")
    for variant in (nvidia, amd):
        assert variant["kernel"] == "_silu_mul_fwd_kernel" and variant["error"] is None
        assert variant["registers"] > 0 and variant["spill_bytes"] == 0 and variant["shared_bytes"] >= 0
    assert nvidia["instructions"] == {"wgmma": 0, "mma": 0, "tma": 0} and amd["instructions"] == {"mfma": 0}

    over = ("import sys; from olmo_fast.kernels import _tuning; _tuning.SPILL_BUDGET_BYTES = -1; "
            "from olmo_fast.benchmarks.compile_triton import main; sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", over, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "OVER SPILL BUDGET" in done.stdout, done.stdout + done.stderr[-3000:]
    assert json.loads(report.read_text())["over_budget"] == 2


def test_attention_forward_uses_wgmma_on_sm90(tmp_path):
    """The attention forward's first config on sm_90 runs on Hopper's tensor cores: wgmma in its PTX, no mma.sync."""
    report = tmp_path / "report.json"
    args = ["--targets", "sm_90", "--cases", "attention_fwd", "--first-config", "--json", str(report)]
    done = subprocess.run([sys.executable, "-m", "olmo_fast.benchmarks.compile_triton", *args],
                          env={**os.environ, "TRITON_INTERPRET": "0"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    (variant,) = json.loads(report.read_text())["variants"]
    assert variant["kernel"] == "_attn_fwd" and variant["instructions"]["wgmma"] > 0, variant
    assert variant["instructions"]["mma"] == 0, variant


def test_attention_variants_on_sm90_use_tma_and_never_spill(tmp_path):
    """Every attention kernel variant compiles for sm_90 with no register spilled (every config its prune keeps);
    the "tma" forwards (one program per block, and persistent) copy their tiles with TMA (`cp.async.bulk.tensor`)
    and multiply with wgmma; on sm_80,
    which has no TMA, the same host function compiles the "fa2" forward instead."""
    report = tmp_path / "report.json"
    cases = "attention_fwd,attention_fwd_tma,attention_fwd_tma_persistent,attention_bwd,attention_bwd_atomic"
    args = ["--targets", "sm_90", "--cases", cases, "--json", str(report)]
    done = subprocess.run([sys.executable, "-m", "olmo_fast.benchmarks.compile_triton", *args],
                          env={**os.environ, "TRITON_INTERPRET": "0"}, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    variants = json.loads(report.read_text())["variants"]
    assert {v["case"] for v in variants} == set(cases.split(","))
    for variant in variants:
        assert variant["error"] is None and variant["spill_bytes"] == 0, variant
    tma = [v for v in variants if v["case"].startswith("attention_fwd_tma")]
    assert {v["kernel"] for v in tma} == {"_attn_fwd_tma", "_attn_fwd_tma_persistent"}
    for variant in tma:
        assert variant["instructions"]["tma"] > 0 and variant["instructions"]["wgmma"] > 0, variant
        assert variant["instructions"]["mma"] == 0, variant

    args = ["--targets", "sm_80", "--cases", "attention_fwd_tma", "--first-config", "--json", str(report)]
    done = subprocess.run([sys.executable, "-m", "olmo_fast.benchmarks.compile_triton", *args],
                          env={**os.environ, "TRITON_INTERPRET": "0"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    (variant,) = json.loads(report.read_text())["variants"]
    assert variant["kernel"] == "_attn_fwd" and variant["instructions"]["tma"] == 0, variant


def _config(block_m, block_n, warps, stages):
    import triton

    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


def test_prune_by_shared_memory_registers_and_stages():
    """Per target: the forward's 128x128 tile in 3 stages (~224 KB of bf16 K/V stages and Q estimated) fits the
    H100's 227 KB of shared memory but not the A100's 163 KB; 4 stages are not kept on AMD (its pipeliner fails on
    them); a tile of 256 fp32 words per thread (a 128x128 accumulator on 2 warps) fits no thread's registers; and
    the prune never returns nothing."""
    import torch

    from olmo_fast.kernels import _tuning
    from olmo_fast.kernels.attention import _fwd_footprint

    args = {"Q": torch.empty(0, dtype=torch.bfloat16), "BLOCK_D": 128}
    wide, deep, spilling = _config(128, 128, 8, 3), _config(64, 32, 4, 4), _config(128, 64, 2, 3)
    sm80, sm90, gfx90a = (_tuning.TARGETS[n] for n in ("sm_80", "sm_90", "gfx90a"))
    assert _fwd_footprint(wide, args, sm80)[0] > sm80.shared_bytes >= _fwd_footprint(deep, args, sm80)[0]
    assert _tuning.prune([wide, deep], sm90, _fwd_footprint, args) == [wide, deep]
    assert _tuning.prune([wide, deep], sm80, _fwd_footprint, args) == [deep]
    assert deep not in _tuning.prune([wide, deep, _config(64, 64, 4, 3)], gfx90a, _fwd_footprint, args)
    for target in (sm80, sm90, gfx90a):
        assert spilling not in _tuning.prune([spilling, deep], target, _fwd_footprint, args)
    assert _tuning.prune([wide], sm80, _fwd_footprint, args) == [wide]  # nothing fits: the smallest is kept


def test_a_config_that_fails_to_compile_is_dropped():
    """The GPU-side guard: a config whose compile raises is dropped with a warning, one that spills over the
    budget is kept only when nothing else compiles, and when every compile fails the first error is raised."""
    from types import SimpleNamespace

    from olmo_fast.kernels import _tuning

    good, bad, spills = _config(64, 64, 4, 3), _config(64, 32, 4, 4), _config(128, 128, 8, 3)
    over = _tuning.SPILL_BUDGET_BYTES // 4 + 1

    def compile_config(config):
        if config is bad:
            raise RuntimeError("PassManager::run failed")
        return SimpleNamespace(n_spills=over if config is spills else 0)

    with pytest.warns(UserWarning, match="PassManager::run failed"):
        assert _tuning.compiled_or_dropped([bad, good, spills], compile_config) == [good]
    with pytest.warns(UserWarning):
        assert _tuning.compiled_or_dropped([bad, spills], compile_config) == [spills]
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="PassManager"):
        _tuning.compiled_or_dropped([bad], compile_config)
