"""Training checkpoints: model, optimizer, schedule position, data position and RNG, written atomically.

Layout: `<save_folder>/step<N>/` holds the model and optimizer through `torch.distributed.checkpoint` (one
`.distcp` file per process, re-sharded on load: a checkpoint from N processes resumes on M), `trainer.pt`
(step, tokens, data order position, RNG) and `model.json` (the ModelConfig). Every process writes into
`.tmp-step<N>/`; rank 0 then fsyncs the files and the folder and renames it to `step<N>/` - a checkpoint
appears complete or not at all, so a crash mid-write never leaves one that looks finished. `trainer.pt` is
written last, so a folder without it (made by hand, or by a foreign tool) is not taken for a checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from ..config import ModelConfig
from .dist import Dist

_STEP = re.compile(r"^step(\d+)$")
TRAINER_FILE, MODEL_CONFIG_FILE = "trainer.pt", "model.json"
# Test hook: seconds to sleep after the tensors are written, before the checkpoint is made complete.
_DELAY_ENV = "OLMO_FAST_CHECKPOINT_DELAY"


def is_checkpoint(path: Path) -> bool:
    return (path / TRAINER_FILE).is_file() and (path / ".metadata").is_file()


def latest_checkpoint(save_folder: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in `save_folder`, or None."""
    folder = Path(save_folder)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP.match(p.name)) and is_checkpoint(p)]
    return max(found)[1] if found else None


@contextlib.contextmanager
def _single_process_ok():
    """Silence DCP's notice that it runs without a process group (the one-process case is intended)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _fsync_tree(folder: Path) -> None:
    for file in folder.iterdir():
        with open(file, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(save_folder: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
         trainer_state: dict[str, Any], model_config: ModelConfig, keep: int, dist: Dist) -> Path:
    """Write `step<step>/` atomically (a collective); keep the newest `keep` checkpoints (-1: all)."""
    final = save_folder / f"step{step}"
    tmp = save_folder / f".tmp-step{step}"
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    with _single_process_ok():
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)},
                 checkpoint_id=str(tmp))
    if dist.main:
        (tmp / MODEL_CONFIG_FILE).write_text(json.dumps(model_config.to_dict()))
        delay = float(os.environ.get(_DELAY_ENV, "0") or 0)
        if delay:
            time.sleep(delay)
        torch.save(trainer_state, tmp / TRAINER_FILE)
        _fsync_tree(tmp)
        if final.exists():  # an earlier run's checkpoint of the same step (save_overwrite)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(save_folder)
        _prune(save_folder, keep)
    dist.barrier()
    return final


def clear_run(save_folder: Path) -> None:
    """Remove the checkpoints, unfinished writes and metrics of an earlier run in `save_folder`."""
    if not save_folder.is_dir():
        return
    for path in save_folder.iterdir():
        if _STEP.match(path.name) or path.name.startswith(".tmp-step"):
            shutil.rmtree(path)
        elif path.name == "metrics.jsonl":
            path.unlink()


def _prune(save_folder: Path, keep: int) -> None:
    if keep < 0:
        return
    steps = sorted((int(m.group(1)), p) for p in save_folder.iterdir() if (m := _STEP.match(p.name)))
    for _, path in steps[:max(len(steps) - keep, 0)]:
        shutil.rmtree(path, ignore_errors=True)


def checkpoint_model_config(path: Path) -> ModelConfig:
    return ModelConfig.from_dict(json.loads((path / MODEL_CONFIG_FILE).read_text()))


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Restore the model (and optimizer, unless None) from checkpoint `path`; return its trainer state."""
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    with _single_process_ok():
        dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])
    return torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=True)


def load_full_model_state(model: nn.Module, full: dict[str, torch.Tensor], dist: Dist) -> None:
    """Load whole tensors (held by rank 0 alone when sharded: the others pass {}) into the model (a collective)."""
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True,
                                                               broadcast_from_rank0=dist.sharded))


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) model state on the CPU, on rank 0 (a collective; other ranks get {})."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
