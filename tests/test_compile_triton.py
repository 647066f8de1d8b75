"""`python -m olmo_fast.benchmarks.compile_triton`: the offline GPU compile check, for one small kernel on sm_90.

Run as the user would, with TRITON_INTERPRET=1 as conftest sets it on CPUs (the tool re-runs itself without the
interpreter): SwiGLU's forward at OLMo-7B's width compiles through ptxas, whose report gives the registers
(none spilled), with the 16 warps `_launch.num_warps` picks for a 4096-element block on 32-lane warps.
A few seconds on a CPU; no GPU needed.
"""
from __future__ import annotations

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
