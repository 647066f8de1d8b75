"""The olmo-fast benchmark suite (installed as `olmo_fast.benchmarks`; run it with `olmo-fast bench`).

Modules: `cases` (ops, inputs, shape sets), `providers` (ours and the alternatives), `roofline` (least bytes and
FLOPs per op), `timing` (CUDA events / perf_counter), `ceilings` (copy bandwidth and matmul FLOP/s measured in
the same run), `suite` (the loop), `report` (table, CSV, JSON, plots, compare, Markdown), and the end-to-end
benches `train_throughput` and `decode_throughput` (on random-weight `models`, ours beside HF transformers').
`conftest` and `test_ops` are the pytest-benchmark front end to the same cases and providers (`pytest
benchmarks/ --benchmark-only`). `gpu_check.sh` runs all of it in one short GPU slot (`check_page` builds its
results page; `interrupt` makes every bench stop on SIGINT/SIGTERM with what it measured written).
`compile_triton` compiles every Triton kernel for sm_80 / sm_90 / gfx90a offline (no GPU) and reports registers,
spills, shared memory and tensor-core/TMA instruction counts per variant.
"""
