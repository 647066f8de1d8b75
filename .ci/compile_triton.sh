#!/usr/bin/env bash
# Offline compile check of every Triton kernel for A100 (sm_80), H100 (sm_90) and MI250X (gfx90a), no GPU needed:
# each kernel variant the autotune prune keeps for a target is compiled with Triton's own backends (ptxas from the
# triton wheel; the AMD backend's LLVM); exits non-zero on any compile failure or on a variant that spills more
# than kernels/_tuning.SPILL_BUDGET_BYTES per thread. The JSON report (registers, spills, shared memory, wgmma /
# mma / TMA / mfma counts per variant) goes to $1 (default: a temporary file, removed).
# ~3 minutes on 2 cores. Usage: .ci/compile_triton.sh [report.json]  (PYTHON=path/to/python; default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
REPORT=${1:-}
if [ -z "$REPORT" ]; then
  REPORT=$(mktemp --suffix=.json)
  trap 'rm -f "$REPORT"' EXIT
fi
TRITON_INTERPRET=0 "$PYTHON" -m olmo_fast.benchmarks.compile_triton --targets sm_80,sm_90,gfx90a --json "$REPORT"
