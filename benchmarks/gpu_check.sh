#!/usr/bin/env bash
# The one-call GPU check: install from this checkout (offline), `olmo-fast info`, the GPU tests, the training and
# generation throughput benches, a short `olmo-fast train` run and the quick kernel suite; then a Markdown page and
# the raw JSON under benchmarks/results/<date>-<card>.{md,json} (and in $OUT, when set, with the log, the CSV and
# the plots).
#
#   bash benchmarks/gpu_check.sh            # from the repository root, on a machine with one CUDA GPU
#
# With the device tool: ONE run call, command `OLMO_FAST_COMMIT=<git rev-parse HEAD, run here> bash
# benchmarks/gpu_check.sh` (the copy there has no .git; the results record that commit), timeout_s 540 (carry
# [".whl"] after benchmarks/fetch_wheels.sh to compare against Liger). The files come back from $OUT: copy the .md
# and .json into benchmarks/results/, commit them, and rebuild the README's Performance section with
# `python -m olmo_fast.benchmarks.report --summary benchmarks/results/*.json`.
#
# Made for a short slot: every stage runs under `timeout`, within a total of GPU_CHECK_TOTAL_S seconds
# (default 460, under 8 minutes on an H100 with the extension build); a stage that would start with too
# little time left is skipped and the page says so. A hang or a failure in one stage never stops the others.
# GPU_CHECK_SKIP="tests kernel-tests" (keys: wheels install info tests kernel-tests train decode trainer bench) skips
# stages, e.g. to rerun only the benches in what is left of a slot.
# Liger-Kernel / flash-attn / apex wheels placed in .whl/ (benchmarks/fetch_wheels.sh gets Liger's; carry .whl
# to the machine) are installed first so that the suite compares against them; else they are "not installed".
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TOTAL=${GPU_CHECK_TOTAL_S:-460}
START=$(date +%s)
RUN=$(mktemp -d /tmp/gpu_check.XXXXXX)
LOG=$RUN/gpu_check.log
SUMMARY=""
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
# No network there: never let transformers / huggingface_hub / datasets try (and wait on) the hub.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1

left() { echo $(( TOTAL - 20 - ($(date +%s) - START) )); }

# stage KEY NAME LIMIT_S COMMAND...: run COMMAND under timeout (capped by what is left of TOTAL, keeping 20 s for
# the report), log it, and note its exit status.
stage() {
    local key=$1 name=$2 limit=$3; shift 3
    if [[ " ${GPU_CHECK_SKIP:-} " == *" $key "* ]]; then
        echo "=== $name: skipped (GPU_CHECK_SKIP) ===" | tee -a "$LOG"
        SUMMARY+="- $name: skipped (GPU_CHECK_SKIP)"$'\n'; return 0
    fi
    local left; left=$(left)
    if (( left < 15 )); then
        echo "=== $name: skipped, ${left}s left of ${TOTAL}s ===" | tee -a "$LOG"
        SUMMARY+="- $name: skipped (time)"$'\n'; return 0
    fi
    (( limit > left )) && limit=$left
    echo "=== $name (limit ${limit}s) ===" | tee -a "$LOG"
    local t0=$(date +%s)
    # SIGINT first: pytest then still prints its failures and summary, the benches stop between measurements
    # (their results are written as they go); SIGKILL 15 s later if that does not end it.
    timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    local what="rc=$rc"; (( rc == 124 || rc == 137 )) && what="timed out (rc=$rc)"
    echo "=== $name: $what in $(( $(date +%s) - t0 ))s ===" | tee -a "$LOG"
    SUMMARY+="- $name: $what in $(( $(date +%s) - t0 ))s"$'\n'
    return "$rc"
}

# --- 1. install (offline); the extension for this card's architecture only
CAP=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>>"$LOG")
[[ -n "$CAP" ]] || { echo "no CUDA device visible to $PY" | tee -a "$LOG"; }
if compgen -G ".whl/*.whl" >/dev/null; then
    stage wheels "optional wheels (.whl)" 60 $PY -m pip install -q --no-index --no-deps --no-build-isolation .whl/*.whl
fi
ARCH=${TORCH_CUDA_ARCH_LIST:-${CAP:-8.0;9.0}}
if ! stage install "install (extension for $ARCH)" 150 env TORCH_CUDA_ARCH_LIST="$ARCH" \
        $PY -m pip install -q --no-index --no-deps --no-build-isolation -e .; then
    stage install "install without the extension (fallback)" 60 env OLMO_FAST_NO_EXT=1 \
        $PY -m pip install -q --no-index --no-deps --no-build-isolation -e .
fi
[[ -f olmo_fast/_build_info.json ]] && { cat olmo_fast/_build_info.json; echo; } | tee -a "$LOG"

# --- 2. what is there
stage info "olmo-fast info" 30 $PY -m olmo_fast.cli info

# --- 3. GPU tests: every gpu-marked test, and the kernel test files (they run on CUDA when it is there). Their
# time goes to Triton compiling and autotuning each kernel variant: pytest-xdist (in the image) runs them on 8 workers.
shopt -s nullglob
KERNEL_TESTS=(tests/test_{attention,decode_attention,layer_norm,swiglu,rope,qkv_rope,linear_cross_entropy,cross_entropy,norm,cpp,ext,extension,kernels}*.py)
shopt -u nullglob
XDIST=()
$PY -c "import xdist" 2>/dev/null && XDIST=(-n "${GPU_CHECK_TEST_WORKERS:-8}")
stage tests "pytest -m gpu" 60 $PY -m pytest -q -p no:cacheprovider --continue-on-collection-errors \
    ${XDIST[@]+"${XDIST[@]}"} -m gpu tests
(( ${#KERNEL_TESTS[@]} )) && stage kernel-tests "kernel tests on CUDA" 60 $PY -m pytest -q -p no:cacheprovider \
    --continue-on-collection-errors ${XDIST[@]+"${XDIST[@]}"} -m "not gpu" "${KERNEL_TESTS[@]}"

# --- 4. training and generation throughput (fixed work: ~30-60 s each on an H100, Triton's compiles included)
# GPU_CHECK_TRAIN_ARGS / GPU_CHECK_DECODE_ARGS add or override arguments (e.g. "--steps 4", "--no-hf").
stage train "train throughput (OLMo-1B, T=4096)" 75 $PY -m olmo_fast.benchmarks.train_throughput \
    --out "$RUN/train.json" ${GPU_CHECK_TRAIN_ARGS:-}
stage decode "decode throughput (OLMo-1B/7B, batch 1/16)" 75 $PY -m olmo_fast.benchmarks.decode_throughput \
    --out "$RUN/decode.json" ${GPU_CHECK_DECODE_ARGS:-}

# The trainer itself (`olmo-fast train`: pinned batches, fused loss without its label sync, fused AdamW, DCP
# checkpoints) on the tiny model and random tokens: 8 steps saving at 4 and 8, then a resume to step 10.
stage trainer "olmo-fast train (tiny, save + resume)" 75 bash -c '
    set -e
    "$1" -c "import numpy as np; np.random.default_rng(0).integers(0, 50000, 256 * 256, dtype=np.uint16).tofile(\"$2\")"
    args=(--model=tiny "--data.paths=[$2]" --global_train_batch_size=8 --device_train_microbatch_size=4
          "--save_folder=$3" --save_interval=4 --console_log_interval=2 --time_limit=40)
    "$1" -m olmo_fast.cli train "${args[@]}" --max_duration=8
    "$1" -m olmo_fast.cli train "${args[@]}" --max_duration=10 --resume
    ls "$3"' _ "$PY" "$RUN/tokens.npy" "$RUN/train-run"

# --- 5. the quick kernel suite, last: it stops starting measurements after --budget-s (what is left of the total)
# and still writes its results. Attention first: it is the headline number (and torch.compile's warm-up is what
# eats the time).
BUDGET=$(( $(left) < 140 ? $(left) - 40 : 100 )); (( BUDGET < 10 )) && BUDGET=10
stage bench "olmo-fast bench --shapes quick" 140 $PY -m olmo_fast.cli bench --shapes quick --out "$RUN/bench" \
    --ops attention,swiglu,layer_norm,rope,qkv_rope,decode_attention --warmup-ms 10 --rep-ms 40 --budget-s "$BUDGET"

# --- 6. results: Markdown page + one raw JSON, in benchmarks/results/ and $OUT
CARD=$($PY -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))" 2>/dev/null || echo unknown-card)
NAME="$(date -u +%Y-%m-%d)-$CARD"
mkdir -p benchmarks/results
printf '## Stages\n\n%s' "$SUMMARY" >"$RUN/stages.md"
timeout 30 $PY -m olmo_fast.benchmarks.report --markdown "benchmarks/results/$NAME.md" \
    "$RUN/bench/bench.json" "$RUN/train.json" "$RUN/decode.json" 2>&1 | tee -a "$LOG"
cat "$RUN/stages.md" >>"benchmarks/results/$NAME.md"
$PY - "$RUN" "benchmarks/results/$NAME.json" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys, pathlib
run, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
parts = {"bench": run / "bench" / "bench.json", "train": run / "train.json", "decode": run / "decode.json"}
raw = {k: json.loads(p.read_text()) if p.is_file() else None for k, p in parts.items()}
out.write_text(json.dumps(raw, indent=1))
print(f"wrote {out}")
EOF
if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    cp "benchmarks/results/$NAME.md" "benchmarks/results/$NAME.json" "$OUT/" 2>/dev/null
    [[ -f "$RUN/bench/bench.csv" ]] && cp "$RUN/bench/bench.csv" "$OUT/$NAME-bench.csv"
    compgen -G "$RUN/bench/plot-*.png" >/dev/null && tar -czf "$OUT/$NAME-plots.tar.gz" -C "$RUN/bench" $(cd "$RUN/bench" && ls plot-*.png)
    cp "$LOG" "$OUT/$NAME.log"
fi
echo "done in $(( $(date +%s) - START ))s: benchmarks/results/$NAME.md"
printf '%s' "$SUMMARY"
