"""Autotuning that fits the target: its limits, config pruning by shared memory and registers, and a compile guard.

`Target` holds what a config must fit: warp size, shared memory (LDS) per block, registers a thread may address
and the register file of an SM/CU. `current()` is the device's (Triton's driver), or the one `use_target` sets
while `benchmarks/compile_triton.py` compiles offline for sm_80 / sm_90 / gfx90a / gfx942.

`autotune(configs, key, footprint)` is `triton.autotune` over per-backend config lists, with an early prune that,
for each launch signature, keeps the configs of the target's backend and:
  1. drops those over the target's threads per block, or (AMD) over its stream pipeliner's depth;
  2. drops those whose estimated shared memory exceeds the target's, or whose estimated register tiles exceed
     TILE_SHARE of what a thread may hold (`footprint(config, args, target) -> (smem bytes, words per thread)`,
     from the kernel's tile shapes by `tile_footprint`);
  3. on a GPU, compiles what remains (without launching) and drops a config whose compile raises or whose
     kernel spills over SPILL_BUDGET_BYTES, so one bad config never fails the op (a warning names it).
Never empty: when nothing fits, the config with the smallest estimate is kept (and its error, if any, raised).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import triton

# Per-thread spill budget in bytes: spill stores + loads as ptxas reports them (AMD: 4 x spilled VGPRs + SGPRs;
# at run time: the kernel's local memory). A few spilled registers cost a few L1-cached accesses per loop step;
# the configs pruned away spill 0.7-24 KB on some target (a tile row per thread: the loop becomes bound by
# local-memory traffic). compile_triton fails CI on a kept config over it.
SPILL_BUDGET_BYTES = 512
# The fraction of a thread's registers that a kernel's tiles (fp32 accumulators and score tiles, MMA operands)
# may take in the estimate of `tile_footprint`; the rest holds addresses, masks, softmax statistics. Calibrated
# on offline compiles of the attention kernels (compile_triton, triton 3.6, bf16, head dim 128) so that what is
# kept stays under SPILL_BUDGET_BYTES: past it sm_80 spills 0.2-24 KB. The AMD backend spills at lower and less
# predictable estimates, so its kernels also list their own (measured) configs.
TILE_SHARE = {"cuda": 0.8, "hip": 0.6}
# AMD's stream pipeliner fails (TritonAMDGPUPipeline) on the attention loops with 4 stages on triton 3.6.
MAX_STAGES = {"hip": 3}


@dataclass(frozen=True)
class Target:
    name: str  # "sm_90", "gfx90a", ... or "cpu" (the interpreter)
    backend: str  # "cuda" | "hip" | "cpu"
    warp_size: int
    shared_bytes: int  # shared memory (LDS) one block may use
    registers: int  # 32-bit registers one thread may address (NVIDIA 255; AMD 256 VGPRs)
    register_file: int  # 32-bit registers of one SM / CU (threads x registers of a block must fit)


TARGETS = {
    "sm_80": Target("sm_80", "cuda", 32, 166912, 255, 65536),  # A100: 163 KB opt-in shared memory per block
    "sm_90": Target("sm_90", "cuda", 32, 232448, 255, 65536),  # H100/H200: 227 KB
    "gfx90a": Target("gfx90a", "hip", 64, 65536, 256, 131072),  # MI250X: 64 KB LDS, 4 SIMDs x 512 VGPRs x 64
    "gfx942": Target("gfx942", "hip", 64, 65536, 256, 131072),  # MI300X
}
_override: list[Target] = []
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # read once, as Triton does
_CPU = Target("cpu", "cpu", 64 if torch.version.hip else 32, 1 << 30, 1 << 30, 1 << 30)


@contextlib.contextmanager
def use_target(target: Target) -> Iterator[None]:
    """`current()` answers `target` meanwhile (offline compiles for a GPU that is not here)."""
    _override.append(target)
    try:
        yield
    finally:
        _override.pop()


def current() -> Target:
    """The target kernels are launched for: `use_target`'s, else the current GPU's, else the interpreter's."""
    if _override:
        return _override[-1]
    if _INTERPRETED or not torch.cuda.is_available():
        return _CPU
    return _device_target(torch.cuda.current_device())


@functools.cache
def _device_target(index: int) -> Target:
    from triton.runtime import driver

    props = driver.active.utils.get_device_properties(index)
    gpu = driver.active.get_current_target()
    backend = "hip" if gpu.backend == "hip" else "cuda"
    name = str(gpu.arch).split(":")[0] if backend == "hip" else f"sm_{gpu.arch}"
    if name in TARGETS:  # the limits compile_triton checks offline (the driver gives AMD's per-block registers)
        return dataclasses.replace(TARGETS[name], shared_bytes=props["max_shared_mem"])
    return Target(name, backend, gpu.warp_size, props["max_shared_mem"], 256 if backend == "hip" else 255,
                  props["max_num_regs"])


Footprint = Callable[[triton.Config, dict, Target], tuple[int, float]]


def fits(config: triton.Config, target: Target, footprint: Footprint, args: dict) -> bool:
    """Whether `config` fits `target` by threads, pipeline depth, estimated shared memory and register tiles."""
    threads = config.num_warps * target.warp_size
    if threads > 1024 or config.num_stages > MAX_STAGES.get(target.backend, config.num_stages):
        return False
    if target.backend == "cpu":
        return True
    smem, words = footprint(config, args, target)
    registers = min(target.registers, target.register_file // threads)
    return smem <= target.shared_bytes and words <= TILE_SHARE[target.backend] * registers


def prune(configs: list[triton.Config], target: Target, footprint: Footprint, args: dict) -> list[triton.Config]:
    """The configs that fit `target`; never empty (else the one of smallest estimated footprint)."""
    kept = [c for c in configs if fits(c, target, footprint, args)]
    return kept or [min(configs, key=lambda c: footprint(c, args, target)[::-1])]


def tile_footprint(config: triton.Config, target: Target, element: int, fp32_tiles: int, resident: int,
                   streamed: int) -> tuple[int, float]:
    """(shared bytes, 32-bit words per thread) of a kernel's tiles: `fp32_tiles` elements of fp32 accumulators
    and score tiles in registers; `resident` input elements loaded once, `streamed` loaded per loop step.
    NVIDIA: each of num_stages stages holds the streamed tiles in shared memory, beside the resident ones; MMA
    operands pass through registers (mma.sync), except the streamed ones on sm_90+, which wgmma reads from shared
    memory (the resident ones stay in registers as its A operand).
    AMD: the stream pipeliner holds num_stages - 1 loads in flight in registers and one in LDS."""
    threads = config.num_warps * target.warp_size
    if target.backend == "hip":
        smem = (config.num_stages - 1) * streamed * element
        operands = resident + (config.num_stages - 1) * streamed
    else:
        smem = (config.num_stages * streamed + resident) * element
        operands = resident + (0 if int(target.name.split("_")[-1]) >= 90 else streamed)
    return smem, (fp32_tiles + operands * element / 4) / threads


def autotune(configs: dict[str, list[triton.Config]], key: list[str], footprint: Footprint):
    """`triton.autotune` over the configs of every backend ("cuda", "hip"; "cpu" under the interpreter), each
    launch pruned to those of its target's backend that fit it (module docstring)."""
    every = [c for group in configs.values() for c in group]
    backend_of = {id(c): backend for backend, group in configs.items() for c in group}
    holder: dict = {}

    def early_prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        target = current()
        own = [c for c in configs if backend_of.get(id(c)) == target.backend] or configs
        kept = prune(own, target, footprint, args)
        on_gpu = any(getattr(a, "is_cuda", False) for a in named_args.values())
        if on_gpu and not _override and len(kept) > 1:
            tuner = holder["tuner"]

            def compile_config(config):
                kernel = tuner.fn.warmup(grid=(1,), **args, **config.all_kwargs())
                kernel._init_handles()  # loads it: raises if it needs more shared memory than the device has
                return kernel

            kept = compiled_or_dropped(kept, compile_config)
        return kept

    def decorate(fn):
        tuner = triton.autotune(configs=every, key=key, prune_configs_by={"early_config_prune": early_prune})(fn)
        holder["tuner"] = tuner
        return tuner

    return decorate


def compiled_or_dropped(configs: list[triton.Config], compile_config: Callable[[triton.Config], object]
                        ) -> list[triton.Config]:
    """The configs whose compile succeeds with at most SPILL_BUDGET_BYTES spilled per thread. `compile_config`
    returns the loaded kernel (its `n_spills`: spilled 32-bit registers) or raises. A config that spills too much
    is kept only if every other one fails; if all fail to compile, the first error is raised."""
    compiled, spilling, errors = [], [], []
    for config in configs:
        try:
            kernel = compile_config(config)
        except Exception as err:  # noqa: BLE001 - any compile error drops the config, not the op
            errors.append((config, err))
            continue
        spill = 4 * (getattr(kernel, "n_spills", 0) or 0)
        (compiled if spill <= SPILL_BUDGET_BYTES else spilling).append((spill, config))
    for config, err in errors:
        warnings.warn(f"autotune: dropped config {config} (compile failed: {type(err).__name__}: "
                      f"{str(err).strip().splitlines()[-1][:200] if str(err).strip() else ''})", stacklevel=2)
    if compiled:
        return [c for _, c in compiled]
    if spilling:
        return [min(spilling, key=lambda s: s[0])[1]]
    raise errors[0][1]
