#!/usr/bin/env bash
# The one-call GPU check, made for a short slot on one GPU. Stages, in this order, each under `timeout`:
#   install (editable, offline, the CUDA extension for this card's architecture only; a plain install without the
#   extension if that fails) -> `olmo-fast info --strict` (a loud list of what did not load) -> the kernel bench
#   (attention first, our providers first) -> training throughput -> decode throughput -> the GPU tests (`-m gpu`
#   on named files) -> the kernel tests on the device (named files; no fp32 attention) -> `olmo-fast train`
#   (tiny model: save, then resume).
#
#   OLMO_FAST_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_check.sh     # on a machine with one CUDA GPU
#   bash benchmarks/gpu_check.sh --dry-run                                  # the same stages on a CPU (CI)
#
# With the device tool: ONE run call, command `OLMO_FAST_COMMIT=<git rev-parse HEAD, run here> bash
# benchmarks/gpu_check.sh` (the copy there has no .git), timeout_s 540 (the default total is 480 s). The run folder
# is $OUT (a temporary folder when OUT is unset), written as it goes, so a killed call still returns the log and the
# partial results (7 files, within what the tool brings back; a file cut by SIGKILL says "state": "running"):
#   <date>-<card>.md    the results page and <date>-<card>.json the raw results (bench, train, decode, info,
#                       tests, trainer, stages), both rewritten before and after every stage;
#   gpu_check.log       everything every stage printed;
#   bench/bench.json, bench/bench.csv, train.json, decode.json: rewritten (atomically) after every measured row.
# Copy the .md and .json into benchmarks/results/, commit them, and rebuild the README's Performance section with
# `python -m olmo_fast.benchmarks.report --summary benchmarks/results/*.json`. (Outside a dry run the script also
# copies them into benchmarks/results/ of the checkout it ran in.) Exit status: 0 when every stage passed, 1 if
# one failed, timed out or had no time left, 2 for a bad argument or no GPU (outside a dry run).
#
# Time: GPU_CHECK_TOTAL_S (default 480) is shared by the stages' limits below (their sum plus 10 s for the final
# page); a stage may also use what the stages before it left unused, never what the later ones are given. A
# stage that overruns gets SIGINT (the benches then stop and keep every row; pytest prints its summary) and,
# shortly after, SIGKILL; SIGINT/SIGTERM to the script are passed on to the running stage the same way, then the
# page is rewritten and it exits 130. GPU_CHECK_SKIP="tests kernel-tests" (stage keys below) skips stages;
# GPU_CHECK_TRAIN_ARGS / GPU_CHECK_DECODE_ARGS add arguments to those benches (e.g. "--steps 4", "--no-hf").
# Liger-Kernel / flash-attn / apex wheels placed in .whl/ (benchmarks/fetch_wheels.sh; carry [".whl"]) are
# installed first, so that the bench compares against them.
#
# --dry-run: CPU only (CUDA_VISIBLE_DEVICES=""), TRITON_INTERPRET=1, tiny shapes and models, `pip install
# --dry-run` (the build is checked, the installed tree kept), a quick subset of the kernel tests; then it checks
# that every stage ended with its section on the page and its data in the JSON (check_page.py --verify).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
case "${1:-}" in
    "") ;;
    --dry-run) DRY=1 ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
[[ -z "${PYTHON:-}" && -x .venv/bin/python ]] && PY=.venv/bin/python  # this checkout's venv, where there is one
START=$(date +%s)
TOTAL=${GPU_CHECK_TOTAL_S:-480}
RESERVE=10  # for the final page
SCRATCH=$(mktemp -d /tmp/gpu_check.XXXXXX)  # what need not come back: tokens, checkpoints, test reports
RUN=${OUT:-$SCRATCH/out}
mkdir -p "$RUN"
LOG=$RUN/gpu_check.log
STAGES=$SCRATCH/stages.jsonl
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
# No network there: never let transformers / huggingface_hub / datasets try (and wait on) the hub.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1

# Stage keys, titles and limits (s) for the default total of 480 s; scaled to GPU_CHECK_TOTAL_S.
KEYS=(install install-fallback info bench train decode tests kernel-tests trainer)
declare -A TITLE=(
    [install]="install (editable, extension for this card)" [install-fallback]="install without the extension"
    [info]="olmo-fast info" [bench]="kernel bench (attention first)" [train]="training throughput"
    [decode]="decode throughput" [tests]="GPU tests (-m gpu, named files)"
    [kernel-tests]="kernel tests (named files, no fp32 attention)" [trainer]="olmo-fast train (save + resume)")
declare -A LIMIT=([install]=90 [install-fallback]=20 [info]=15 [bench]=150 [train]=50 [decode]=45 [tests]=30
                  [kernel-tests]=45 [trainer]=25)
NOMINAL=0; for k in "${KEYS[@]}"; do NOMINAL=$(( NOMINAL + LIMIT[$k] )); done
for k in "${KEYS[@]}"; do LIMIT[$k]=$(( LIMIT[$k] * (TOTAL - RESERVE) / NOMINAL )); done

if (( DRY )); then
    export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
    BENCH_ARGS=(--device cpu --shapes cpu-small --dtype fp32 --warmup-ms 1 --rep-ms 1)
    TRAIN_ARGS=(--device cpu --model test --seq-len 16 --batch 2 --steps 1 --warmup 1)
    DECODE_ARGS=(--device cpu --models test --batches 1,2 --prompt-len 4 --new-tokens 3 --dtype fp32)
    TRAINER_MODEL=test TRAINER_VOCAB=250
    TEST_SUBSET="bad_inputs or bad_positions or odd_width or loads_and_registers"  # kernel tests: a quick slice
    PIP_DRY=(--dry-run)
else
    BENCH_ARGS=(--shapes quick --warmup-ms 10 --rep-ms 40)
    TRAIN_ARGS=() DECODE_ARGS=()
    TRAINER_MODEL=tiny TRAINER_VOCAB=50000
    TEST_SUBSET=""
    PIP_DRY=()
fi

# The card (and the page's name) before anything else.
read -r CAP CARD < <("$PY" -c "import re, torch
ok = torch.cuda.is_available()
print('%d.%d' % torch.cuda.get_device_capability() if ok else 'none',
      re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-') if ok else 'cpu')" 2>>"$LOG")
CAP=${CAP:-none} CARD=${CARD:-unknown}
(( DRY )) && CARD=$CARD-dry-run
NAME="$(date -u +%Y-%m-%d)-$CARD"

json_str() { local s=${1//\\/\\\\}; s=${s//\"/\\\"}; printf '"%s"' "$s"; }
# record KEY STATUS [SECONDS] [LIMIT] [NOTE]: one stage record (the latest of a key wins).
record() {
    printf '{"key": %s, "title": %s, "status": %s, "seconds": %s, "limit_s": %s, "note": %s}\n' "$(json_str "$1")" \
        "$(json_str "${TITLE[$1]}")" "$(json_str "$2")" "${3:-null}" "${4:-null}" "$(json_str "${5:-}")" >>"$STAGES"
}
# page [--verify]: rewrite the page and the raw JSON from what the run folder holds now.
page() {
    timeout 30 "$PY" benchmarks/check_page.py --stages "$STAGES" --md "$RUN/$NAME.md" --json "$RUN/$NAME.json" "$@" \
        info="$SCRATCH/info.json" bench="$RUN/bench/bench.json" train="$RUN/train.json" decode="$RUN/decode.json" \
        tests="$SCRATCH/tests.xml" kernel-tests="$SCRATCH/kernel-tests.xml" trainer="$SCRATCH/trainer" \
        2>&1 | tee -a "$LOG"
    return "${PIPESTATUS[0]}"
}
# limit KEY: the stage's limit now: what is left of the total, less the limits of the stages after it and the
# reserve (so it gets its own limit plus whatever the stages before it left unused).
limit() {
    local later=0 seen=0 k
    for k in "${KEYS[@]}"; do
        (( seen )) && later=$(( later + LIMIT[$k] ))
        [[ $k == "$1" ]] && seen=1
    done
    echo $(( TOTAL - RESERVE - ($(date +%s) - START) - later ))
}

CURRENT="" STAGE_PID="" T0=0 FAILED=0
# stage KEY COMMAND...: run COMMAND under its limit (SIGINT at the limit less a grace, SIGKILL at the limit), log
# it, record how it ended and rewrite the page. Returns the command's exit status. The command runs in the
# background (`timeout` gives it its own process group and the default SIGINT back) while the script waits, so
# that a signal to the script is handled at once: passed on to the stage, which stops and writes what it has.
stage() {
    local key=$1; shift
    if [[ " ${GPU_CHECK_SKIP:-} " == *" $key "* ]]; then
        echo "=== ${TITLE[$key]}: skipped (GPU_CHECK_SKIP) ===" | tee -a "$LOG"
        record "$key" skipped "" "" "GPU_CHECK_SKIP"; page; return 0
    fi
    local lim; lim=$(limit "$key")
    if (( lim < 5 )); then
        echo "=== ${TITLE[$key]}: no time left (${lim}s) ===" | tee -a "$LOG"
        record "$key" "no time" "" "$lim"; FAILED=1; page; return 1
    fi
    local grace=$(( lim / 4 < 10 ? (lim / 4 > 0 ? lim / 4 : 1) : 10 ))
    CURRENT=$key T0=$(date +%s)
    record "$key" running "" "$lim"; page
    echo "=== ${TITLE[$key]} (limit ${lim}s) ===" | tee -a "$LOG"
    # tee ignores SIGINT/SIGTERM: it must outlive the stage it logs, which prints as it stops.
    timeout --signal=INT --kill-after="$grace" "$(( lim - grace ))" "$@" \
        > >(trap '' INT TERM; exec tee -a "$LOG") 2>&1 &
    STAGE_PID=$!
    wait "$STAGE_PID"
    local rc=$? status
    STAGE_PID=""
    case $rc in
        0) status=ok ;;
        124) status="timed out" ;;
        137) status="killed at the limit" ;;
        *) status="failed (rc=$rc)" ;;
    esac
    (( rc )) && FAILED=1
    CURRENT=""
    echo "=== ${TITLE[$key]}: $status in $(( $(date +%s) - T0 ))s ===" | tee -a "$LOG"
    record "$key" "$status" "$(( $(date +%s) - T0 ))" "$lim"; page
    return "$rc"
}
# SIGINT/SIGTERM to the script: the running stage gets SIGINT (and SIGKILL after its grace, from its `timeout`),
# then the page is rewritten with that stage marked interrupted.
on_signal() {
    trap '' INT TERM
    if [[ -n $STAGE_PID ]]; then
        kill -INT "$STAGE_PID" 2>/dev/null
        wait "$STAGE_PID"
    fi
    [[ -n $CURRENT ]] && record "$CURRENT" interrupted "$(( $(date +%s) - T0 ))" "" "the check itself got a signal"
    page; echo "gpu_check: interrupted; partial results in $RUN" | tee -a "$LOG"; exit 130
}
trap on_signal INT TERM
# The scratch folder goes at the end (its results are in the page and the raw JSON), unless it holds the run folder.
[[ -n "${OUT:-}" ]] && trap 'rm -rf "$SCRATCH"' EXIT

# The plan: the first stage record (check_page lists every planned stage, run or not).
{
    printf '{"plan": ['
    sep=""; for k in "${KEYS[@]}"; do
        printf '%s{"key": %s, "title": %s, "limit_s": %s}' "$sep" "$(json_str "$k")" "$(json_str "${TITLE[$k]}")" \
            "${LIMIT[$k]}"
        sep=", "
    done
    printf '], "dry_run": %s, "commit": %s, "started": %s, "total_s": %s}\n' \
        "$( (( DRY )) && echo true || echo false)" \
        "$(json_str "${OLMO_FAST_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}")" \
        "$(json_str "$(date -u +%Y-%m-%dT%H:%M:%SZ)")" "$TOTAL"
} >"$STAGES"
echo "gpu_check$( (( DRY )) && echo ' --dry-run'): $NAME, capability $CAP, total ${TOTAL}s, python $PY;" \
    "run folder $RUN" | tee -a "$LOG"
if (( ! DRY )) && [[ $CAP == none ]]; then
    echo "gpu_check: no CUDA device visible to $PY: nothing to measure (on a CPU, use --dry-run)" | tee -a "$LOG"
    page; exit 2
fi
page

# --- 1. install (offline): optional wheels, then this checkout, the extension for this card only
PIP=("$PY" -m pip install -q --no-index --no-deps --no-build-isolation ${PIP_DRY[@]+"${PIP_DRY[@]}"})
ARCH=${TORCH_CUDA_ARCH_LIST:-${CAP/none/8.0;9.0}}
# INSTALL VAR=VALUE... -- PIP...: the wheels in .whl/ (if any), then `PIP -e .` with those variables set.
INSTALL=(bash -c 'vars=(); while [[ $1 != -- ]]; do vars+=("$1"); shift; done; shift
    if compgen -G ".whl/*.whl" >/dev/null; then "$@" .whl/*.whl || exit; fi
    env "${vars[@]}" "$@" -e .' _)
if stage install "${INSTALL[@]}" TORCH_CUDA_ARCH_LIST="$ARCH" -- "${PIP[@]}"; then
    record install-fallback "not needed"
else
    stage install-fallback "${INSTALL[@]}" OLMO_FAST_NO_EXT=1 -- "${PIP[@]}"
fi
[[ -f olmo_fast/_build_info.json ]] && { echo "build record:"; cat olmo_fast/_build_info.json; echo; } | tee -a "$LOG"

# --- 2. what loaded, and a loud list of what did not
stage info "$PY" -m olmo_fast.cli info --strict --save "$SCRATCH/info.json"

# --- 3. the kernel bench: attention first (the headline), ours first within each case (providers.registry)
BUDGET=$(( $(limit bench) * 3 / 4 ))
stage bench "$PY" -m olmo_fast.cli bench --ops attention,decode_attention,swiglu,layer_norm,rope,qkv_rope,qk_norm_rope \
    --out "$RUN/bench" --no-plots --budget-s "$(( BUDGET > 10 ? BUDGET : 10 ))" "${BENCH_ARGS[@]}"

# --- 4. training and decode throughput (ours beside HF transformers)
# shellcheck disable=SC2086  # the extra arguments are words
stage train "$PY" -m olmo_fast.benchmarks.train_throughput --out "$RUN/train.json" \
    ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"} ${GPU_CHECK_TRAIN_ARGS:-}
# shellcheck disable=SC2086
stage decode "$PY" -m olmo_fast.benchmarks.decode_throughput --out "$RUN/decode.json" \
    ${DECODE_ARGS[@]+"${DECODE_ARGS[@]}"} ${GPU_CHECK_DECODE_ARGS:-}

# --- 5. tests on the device: named files only (no collection of the whole suite). Their time is Triton compiling
# (and autotuning) each kernel variant: pytest-xdist, where installed, spreads them over workers.
PYTEST=("$PY" -m pytest -q -p no:cacheprovider --continue-on-collection-errors)
"$PY" -c "import xdist" 2>/dev/null && PYTEST+=(-n "${GPU_CHECK_TEST_WORKERS:-8}")
# existing FILE...: the files that exist (a missing one is logged). With none, the stage runs `false`: never a bare
# pytest, which would collect the whole suite.
existing() {
    local f
    for f in "$@"; do if [[ -f $f ]]; then echo "$f"; else echo "gpu_check: no $f (renamed?)" >&2; fi; done
}
# The gpu-marked tests: bf16/fp16 attention and decode attention against float64, CUDA-graph decoding, the cpp
# backend's CUDA kernels (tensor-core attention, decode, prologue, cross-entropy) through the binding.
mapfile -t GPU_TESTS < <(existing tests/test_{attention,decode_attention,generate,cpp_gpu_kernels}.py 2>>"$LOG")
if (( ${#GPU_TESTS[@]} )); then
    stage tests "${PYTEST[@]}" -m gpu --junitxml="$SCRATCH/tests.xml" "${GPU_TESTS[@]}"
else
    stage tests false
fi
# Every kernel's CPU-run tests, here on the device. Not the fp32 attention ones: fp32 tl.dot (ieee) compiles for
# minutes per config on sm_90 and spills; these are the fp32-parametrized cases and the tests written in fp32.
NO_FP32_ATTENTION="not (test_attention and (float32 or fully_masked or block_shapes or expanded_dout or olmo_with))"
mapfile -t KERNEL_TESTS < <(existing tests/test_{attention,decode_attention,layer_norm,rms_norm_add,swiglu,rope,qkv_rope,qk_norm_rope}.py \
    tests/test_linear_cross_entropy.py tests/test_cpp_extension.py 2>>"$LOG")
if (( ${#KERNEL_TESTS[@]} )); then
    stage kernel-tests "${PYTEST[@]}" -m "not gpu and not slow" --junitxml="$SCRATCH/kernel-tests.xml" \
        -k "($NO_FP32_ATTENTION)${TEST_SUBSET:+ and ($TEST_SUBSET)}" "${KERNEL_TESTS[@]}"
else
    stage kernel-tests false
fi

# --- 6. the trainer itself (`olmo-fast train`: pinned batches, fused loss, fused AdamW, checkpoints) on random
# tokens: 8 steps saving at 4 and 8, then a resume to step 10.
stage trainer bash -c '
    set -e
    "$1" -c "import numpy as np; np.random.default_rng(0).integers(0, $5, 256 * 256, dtype=np.uint16).tofile(\"$2\")"
    args=(--model="$4" "--data.paths=[$2]" --global_train_batch_size=8 --device_train_microbatch_size=4
          "--save_folder=$3" --save_interval=4 --console_log_interval=2 --time_limit=40)
    "$1" -m olmo_fast.cli train "${args[@]}" --max_duration=8
    "$1" -m olmo_fast.cli train "${args[@]}" --max_duration=10 --resume
    ls "$3"' _ "$PY" "$SCRATCH/tokens.npy" "$SCRATCH/trainer" "$TRAINER_MODEL" "$TRAINER_VOCAB"

# --- 7. the final page; the dry run checks that every stage left its section and its data
if (( DRY )); then
    page --verify || FAILED=1
else
    page
    mkdir -p benchmarks/results && cp "$RUN/$NAME.md" "$RUN/$NAME.json" benchmarks/results/
fi
VERDICT=$( (( FAILED )) && echo "SOME STAGE FAILED" || echo "every stage passed")
echo "gpu_check: done in $(( $(date +%s) - START ))s; $VERDICT: $RUN/$NAME.md" | tee -a "$LOG"
exit "$FAILED"
