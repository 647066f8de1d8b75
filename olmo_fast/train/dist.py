"""Processes and sharding: one process, or `torchrun` with FSDP2 (`fully_shard`) - NCCL on GPUs, gloo on CPUs.

FSDP precision (`fsdp.precision`), as OLMo names it: `mixed` computes with bf16 parameters and reduces gradients
in fp32; `pure` does both in bf16; `full` keeps fp32 throughout (the CPU default, where precision is fp32).
The sharded parameters themselves - the master weights the optimizer updates - are always fp32.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.sharded:
            dist.barrier()

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """Average over processes (a collective: every rank must call it)."""
        return self.sum(t) / self.world if self.sharded else t

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over processes (a collective: every rank must call it)."""
        if self.sharded:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast(self, value):
        """Rank 0's `value` on every rank."""
        if not self.sharded:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.sharded and dist.is_initialized():
            dist.destroy_process_group()


def init(device: str | None = None) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    wanted = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(wanted)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda was asked for, but torch sees no GPU")
        dev = torch.device("cuda", local if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
    return Dist(rank, world, dev)


def shard(model: nn.Module, precision: str) -> nn.Module:
    """FSDP2: shard each block, then the root (embedding / head); `precision` is fsdp.precision."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = {
        "mixed": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
        "pure": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16),
        "full": MixedPrecisionPolicy(),
    }[precision]
    blocks = model.transformer["blocks"]
    for i, block in enumerate(blocks):
        # The last block's backward comes right after the forward: keep its parameters gathered (torchtitan's).
        fully_shard(block, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mp_policy=policy)
    return model
