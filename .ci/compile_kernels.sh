#!/usr/bin/env bash
# Compile check of the compiled extension's sources, warnings as errors; exits non-zero on any failure.
#   1. every csrc/kernels/*.cu (and the test kernels csrc/tests/*.cu) with nvcc for sm_80 and sm_90;
#   2. every kernel as HIP with Debian's hipcc for gfx90a (installed with apt-get when absent);
#   3. the CPU loops with CMake (warnings as errors) and csrc/tests/cpu_loops_test.cpp through ctest;
#   4. the GPU path of setup.py (nvcc objects + the torch binding with OLMO_FAST_WITH_GPU, cudart linked), then
#      the resulting olmo_fast._C loaded into the (CPU) torch: the binding compiles, links and registers a
#      CUDA kernel for every op that has a CPU one.
# No GPU is needed. Usage: .ci/compile_kernels.sh  (PYTHON=path/to/python with torch for step 4; default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
PYTHON=${PYTHON:-.venv/bin/python}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
INC=-Icsrc/include
WARN=(-Wall -Wextra -Werror)

echo "== nvcc ($("$NVCC" --version | tail -1)): sm_80, sm_90"
for src in csrc/kernels/*.cu csrc/tests/*.cu; do
  "$NVCC" -std=c++17 -O3 $INC -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    --Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror,-fPIC -c "$src" -o "$OUT/$(basename "$src").o" &
done
wait_all() { local rc=0; for job in $(jobs -p); do wait "$job" || rc=1; done; return $rc; }
wait_all

if ! command -v hipcc >/dev/null; then
  echo "== installing hipcc (apt-get)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hipcc) >/dev/null
fi
echo "== hipcc ($(hipcc --version 2>/dev/null | head -1)): gfx90a"
for src in csrc/kernels/*.cu csrc/tests/*.cu; do
  HIP_PLATFORM=amd hipcc -x hip -std=c++17 -O3 $INC --offload-arch=gfx90a "${WARN[@]}" -fPIC \
    -c "$src" -o "$OUT/$(basename "$src").hip.o" &
done
wait_all

echo "== CMake: CPU loops + their torch-free test (ctest)"
cmake -S . -B "$OUT/cmake" -DOLMO_FAST_GPU=NONE >/dev/null
cmake --build "$OUT/cmake" -j 2 >"$OUT/cmake.log" 2>&1 || { cat "$OUT/cmake.log"; exit 1; }
ctest --test-dir "$OUT/cmake" --output-on-failure >"$OUT/ctest.log" 2>&1 || { cat "$OUT/ctest.log"; exit 1; }

if [ -x "$PYTHON" ] || command -v "$PYTHON" >/dev/null; then
  echo "== setup.py GPU path (OLMO_FAST_GPU=cuda) with $PYTHON"
  OLMO_FAST_GPU=cuda "$PYTHON" setup.py -q build_ext \
    -b "$OUT/lib" -t "$OUT/tmp" >"$OUT/build.log" 2>&1 || { cat "$OUT/build.log"; exit 1; }
  "$PYTHON" - "$OUT/lib" <<'PY'
import glob, json, sys
import torch
lib = sys.argv[1]
info = json.load(open(f"{lib}/olmo_fast/_build_info.json"))
assert info["built"] and info["gpu"] == "cuda", f"the CUDA extension did not build: {info}"
torch.ops.load_library(glob.glob(f"{lib}/olmo_fast/_C*.so")[0])
assert torch.ops.olmo_fast_C.gpu_runtime() == "cuda"
x = torch.randn(3, 8)
y = torch.ops.olmo_fast_C.layer_norm_fwd(x, None, 1e-5)[0]
torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (8,)))
ops = [op.split("::")[1] for op in torch._C._dispatch_get_all_op_names() if op.startswith("olmo_fast_C::")]
kernels = [op for op in ops if torch._C._dispatch_has_kernel_for_dispatch_key(f"olmo_fast_C::{op}", "CPU")]
missing = [op for op in kernels if not torch._C._dispatch_has_kernel_for_dispatch_key(f"olmo_fast_C::{op}", "CUDA")]
assert not missing, f"kernels with a CPU loop but no CUDA/HIP kernel: {missing}"
print(f"   built in {info['seconds']} s for {info['archs']}; loads, registers a CUDA kernel for each of its "
      f"{len(kernels)} ops, runs on the CPU")
PY
else
  echo "== no $PYTHON: skipping the setup.py GPU build (set PYTHON=python-with-torch)" >&2
  exit 1
fi
echo "compile_kernels: OK"
