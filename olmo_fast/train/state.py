"""Training checkpoints: model, optimizer, schedule position, data position and RNG - safetensors and JSON only,
written atomically.

`<save_folder>/step<N>/` holds:
  shard-<r>-of-<W>.safetensors  process r's part of the model and AdamW tensors, named `model/<fqn>` and
                                `optim/<fqn>/<exp_avg | exp_avg_sq | step>`: its rows of each FSDP2 dim-0 shard;
                                the tensors every process holds whole are written by rank 0 alone
  index.json                    tensor name -> global shape, dtype, and the rows [start, start + rows) each shard
                                file holds; written last: the mark of a complete checkpoint
  optimizer.json                AdamW's parameter groups (hyperparameters, parameter names)
  trainer.json                  step, tokens, data order position, RNG state (tensors as base64)
  model.json                    the ModelConfig: a run that loads the checkpoint gets this model, and a `model`
                                setting that differs from it is an error
Each process reads only the rows its own shards need (safetensors slices), so a checkpoint written by N processes
resumes on M. Every process writes into `.tmp-step<N>/`; rank 0 then writes the JSON files, fsyncs them all and
renames the folder to `step<N>/`: a checkpoint appears complete or not at all.

Nothing here unpickles. Checkpoints of earlier versions (torch.distributed.checkpoint's `.metadata` and a
`trainer.pt` from torch.save - pickles, which can run code when read) are refused unless the caller trusts them
(`--trust_pickle_checkpoint`).
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from ..checkpoint import CheckpointError
from ..config import ConfigError, ModelConfig
from .dist import Dist

_STEP = re.compile(r"^step(\d+)$")
_SHARD = re.compile(r"^shard-(\d{5})-of-(\d{5})\.safetensors$")
INDEX_FILE, MODEL_CONFIG_FILE, TRAINER_FILE, OPTIMIZER_FILE = "index.json", "model.json", "trainer.json", \
    "optimizer.json"
FORMAT = "olmo-fast-sharded-1"
TRAINER_KEYS = frozenset({"global_step", "global_train_tokens_seen", "data", "rng"})  # what Trainer restores
LEGACY_FILES = (".metadata", "trainer.pt")  # torch.distributed.checkpoint's metadata and torch.save's: pickles
TRUST_FLAG = "--trust_pickle_checkpoint"
# AdamW group keys that say how this run's optimizer computes, not what it computes: kept on load.
_IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")
# Test hook: seconds to sleep after the tensors are written, before the checkpoint is made complete.
_DELAY_ENV = "OLMO_FAST_CHECKPOINT_DELAY"


def is_checkpoint(path: Path) -> bool:
    """A complete training checkpoint: ours (with its index.json) or one in the old pickle-based layout."""
    return (path / INDEX_FILE).is_file() or is_legacy_checkpoint(path)


def is_legacy_checkpoint(path: Path) -> bool:
    return not (path / INDEX_FILE).is_file() and all((path / name).is_file() for name in LEGACY_FILES)


def latest_checkpoint(save_folder: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in `save_folder`, or None."""
    folder = Path(save_folder)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP.match(p.name)) and is_checkpoint(p)]
    return max(found)[1] if found else None


def _refuse_pickles(path: Path, trust_pickle: bool) -> None:
    if is_legacy_checkpoint(path) and not trust_pickle:
        raise CheckpointError(f"{path} is a checkpoint in the old format, whose .metadata and trainer.pt are pickles "
                              f"that can run code when read; only if you trust where it came from, pass {TRUST_FLAG}")


# ---------------------------------------------------------------------------------------------- tensors
def _named_tensors(model_state: dict[str, Any], optim_state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors by name: the values of the state dicts themselves (filling them fills those)."""
    tensors = {f"model/{fqn}": t for fqn, t in model_state.items()}
    for fqn, entries in optim_state.items():
        tensors.update({f"optim/{fqn}/{key}": t for key, t in entries.items()})
    return tensors


def _local(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(what this process holds of `t`, whether that is a dim-0 shard of it rather than all of it)."""
    if not isinstance(t, DTensor):
        return t, False
    placements = tuple(t.placements)
    if len(placements) == 1 and placements[0].is_shard(0):
        return t.to_local(), True
    if all(p.is_replicate() for p in placements):
        return t.to_local(), False
    raise NotImplementedError(f"checkpoints hold dim-0 shards or whole tensors, not {placements}")


def _rows_by_rank(local: dict[str, tuple[torch.Tensor, bool]]) -> dict[str, list[int]]:
    """For each sharded tensor, the rows every process holds, by rank (Shard(0) puts rank r's rows after r - 1's)."""
    mine = {name: part.shape[0] for name, (part, sharded) in local.items() if sharded}
    if not (torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
        return {name: [rows] for name, rows in mine.items()}
    everyone: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(everyone, mine)  # between this run's own processes, never from a file
    return {name: [ranks[name] for ranks in everyone] for name in mine}


def _rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_initialized() else 0


def _shard_file(rank: int, world: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}.safetensors"


def _write_shards(folder: Path, tensors: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, Any]:
    """Write this process's parts of `tensors` to its shard file; return the index of every process's parts."""
    from safetensors.torch import save_file

    local = {name: _local(t) for name, t in tensors.items()}
    rows = _rows_by_rank(local)
    mine, entries = {}, {}
    for name, t in tensors.items():
        part, sharded = local[name]
        if sharded:
            starts = [sum(rows[name][:r]) for r in range(world)]
            pieces = [{"file": _shard_file(r, world), "start": starts[r], "rows": n}
                      for r, n in enumerate(rows[name]) if n]
        else:
            pieces = [{"file": _shard_file(0, world), "start": 0, "rows": part.shape[0] if part.dim() else None}]
        if any(piece["file"] == _shard_file(rank, world) for piece in pieces):
            mine[name] = part.detach().cpu().contiguous()
        entries[name] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "shards": pieces}
    save_file(mine, str(folder / _shard_file(rank, world)), metadata={"format": FORMAT})
    return {"format": FORMAT, "world_size": world, "tensors": entries}


def _check_index(path: Path, index: Any) -> dict[str, Any]:
    """The index's tensor entries, each checked to name shard files and to tile its rows exactly."""
    try:
        if index.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not an olmo-fast checkpoint index (format {index.get('format')!r})")
        entries = index["tensors"]
        for name, entry in entries.items():
            shape, pieces = [int(n) for n in entry["shape"]], entry["shards"]
            if not pieces or any(not _SHARD.match(str(piece["file"])) for piece in pieces):
                raise ValueError(f"bad shard list for {name}")
            covered = 0
            for piece in sorted(pieces, key=lambda piece: piece["start"]) if shape else []:
                if piece["start"] != covered or piece["rows"] <= 0:
                    raise ValueError(f"the shards of {name} do not tile its rows")
                covered += piece["rows"]
            if shape and covered != shape[0]:
                raise ValueError(f"the shards of {name} hold {covered} of its {shape[0]} rows")
        return entries
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path} is malformed: {err}") from None


def _read_rows(folder: Path, name: str, entry: dict[str, Any], target: torch.Tensor, start: int, files) -> None:
    """Copy rows [start, start + len(target)) of checkpoint tensor `name` (all of it when 0-d) into `target`."""
    end = start + (target.shape[0] if target.dim() else 0)
    for piece in entry["shards"]:
        if target.dim() == 0:
            lo = hi = 0
            part = files(piece["file"]).get_tensor(name)
            dest = target
        else:
            lo, hi = max(start, piece["start"]), min(end, piece["start"] + piece["rows"])
            if lo >= hi:
                continue
            part = files(piece["file"]).get_slice(name)[lo - piece["start"]:hi - piece["start"]]
            dest = target[lo - start:hi - start]
        if part.shape != dest.shape or part.dtype != dest.dtype:
            raise CheckpointError(f"{folder / piece['file']}: {name} rows {lo}:{hi} are {part.dtype} "
                                  f"{tuple(part.shape)}, expected {dest.dtype} {tuple(dest.shape)}")
        dest.copy_(part)


def _read_tensors(folder: Path, entries: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Fill each of `tensors` (this process's part of it) from the checkpoint in `folder`."""
    from safetensors import SafetensorError, safe_open

    with torch.no_grad():  # the local tensors themselves (not autograd views of them) are filled in place
        local = {name: _local(t) for name, t in tensors.items()}
    rows, rank = _rows_by_rank(local), _rank()
    with contextlib.ExitStack() as stack, torch.no_grad():
        opened: dict[str, Any] = {}

        def files(name: str):
            if name not in opened:
                try:
                    opened[name] = stack.enter_context(safe_open(str(folder / name), framework="pt", device="cpu"))
                except (SafetensorError, OSError) as err:
                    raise CheckpointError(f"cannot read {folder / name}: {err}") from None
            return opened[name]

        for name, t in tensors.items():
            if name not in entries:
                raise CheckpointError(f"{folder} has no tensor {name!r}")
            if list(t.shape) != entries[name]["shape"]:
                raise CheckpointError(f"{folder}: {name} has shape {tuple(entries[name]['shape'])}, this run's "
                                      f"model needs {tuple(t.shape)}")
            part, sharded = local[name]
            try:
                _read_rows(folder, name, entries[name], part, sum(rows[name][:rank]) if sharded else 0, files)
            except SafetensorError as err:
                raise CheckpointError(f"cannot read {name} from {folder}: {err}") from None


# ---------------------------------------------------------------------------------------------- JSON files
def _encode(value: Any) -> Any:
    """JSON-ready `value`: tensors (RNG states) become {"tensor": dtype, "shape", "base64"}."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        return {"tensor": str(value.dtype).removeprefix("torch."), "shape": list(value.shape),
                "base64": base64.b64encode(flat.view(torch.uint8).numpy().tobytes()).decode()}
    if isinstance(value, dict):
        return {key: _encode(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"tensor", "shape", "base64"}:
        dtype = getattr(torch, str(value["tensor"]), None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"unknown tensor dtype {value['tensor']!r} in the trainer state")
        raw = bytearray(base64.b64decode(value["base64"], validate=True))
        return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(value["shape"]).clone()
    if isinstance(value, dict):
        return {key: _decode(v) for key, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except OSError as err:
        raise CheckpointError(f"cannot read {file}: {err.strerror or err}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file} is not JSON: {err}") from None


# ---------------------------------------------------------------------------------------------- writing
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
    optim = get_optimizer_state_dict(model, optimizer)
    index = _write_shards(tmp, _named_tensors(get_model_state_dict(model), optim["state"]), dist.rank, dist.world)
    dist.barrier()
    if dist.main:
        (tmp / MODEL_CONFIG_FILE).write_text(json.dumps(model_config.to_dict()))
        delay = float(os.environ.get(_DELAY_ENV, "0") or 0)
        if delay:
            time.sleep(delay)
        (tmp / OPTIMIZER_FILE).write_text(json.dumps(optim["param_groups"]))
        (tmp / TRAINER_FILE).write_text(json.dumps(_encode(trainer_state)))
        (tmp / INDEX_FILE).write_text(json.dumps(index))
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


# ---------------------------------------------------------------------------------------------- reading
def checkpoint_model_config(path: Path, expected: ModelConfig | None = None,
                            trust_pickle: bool = False) -> ModelConfig:
    """The model of checkpoint `path` (its model.json). `expected`: the model the run's settings ask for, which
    must be the same. Checked before anything is built: an old pickle-based checkpoint is refused here too."""
    _refuse_pickles(path, trust_pickle)
    values = _read_json(path / MODEL_CONFIG_FILE)
    if not isinstance(values, dict):
        raise CheckpointError(f"{path / MODEL_CONFIG_FILE} does not hold a model config")
    try:
        config = ModelConfig.from_dict(values)
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"{path / MODEL_CONFIG_FILE}: {err}") from None
    if expected is not None and expected != config:
        differ = [f"{f.name}={getattr(expected, f.name)!r} (checkpoint: {getattr(config, f.name)!r})"
                  for f in dataclasses.fields(ModelConfig) if getattr(expected, f.name) != getattr(config, f.name)]
        raise CheckpointError(f"the model settings differ from checkpoint {path}'s model.json: {', '.join(differ)}; "
                              f"drop them (--model=null) to take the checkpoint's model")
    return config


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
         trust_pickle: bool = False) -> dict[str, Any]:
    """Restore the model (and optimizer, unless None) from checkpoint `path`; return its trainer state
    (a collective when sharded)."""
    _refuse_pickles(path, trust_pickle)
    if is_legacy_checkpoint(path):
        return _load_legacy(path, model, optimizer)
    entries = _check_index(path / INDEX_FILE, _read_json(path / INDEX_FILE))
    trainer = _decode(_read_json(path / TRAINER_FILE))
    if not isinstance(trainer, dict) or not TRAINER_KEYS <= set(trainer):
        raise CheckpointError(f"{path / TRAINER_FILE} does not hold a trainer state "
                              f"({', '.join(sorted(TRAINER_KEYS))})")
    model_state = get_model_state_dict(model)
    optim = get_optimizer_state_dict(model, optimizer) if optimizer is not None else {"state": {}}
    tensors = _named_tensors(model_state, optim["state"])
    extra = sorted(name for name in entries if name.startswith("model/") and name not in tensors)
    if extra:
        raise CheckpointError(f"{path} holds tensors this run's model has not, e.g. {extra[0].removeprefix('model/')}")
    _read_tensors(path, entries, tensors)
    set_model_state_dict(model, model_state)
    if optimizer is not None:
        groups = _param_groups(path / OPTIMIZER_FILE, optim["param_groups"])
        set_optimizer_state_dict(model, optimizer, {"state": optim["state"], "param_groups": groups})
    return trainer


def _param_groups(file: Path, current: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The saved parameter groups (hyperparameters), for the same parameters as `current`'s, computed the way
    this run's optimizer computes (fused / foreach ...)."""
    saved = _read_json(file)
    try:
        if [group["params"] for group in saved] != [group["params"] for group in current]:
            raise CheckpointError(f"{file}: the optimizer's parameter groups differ from this run's (changed "
                                  f"optimizer.decay_*?); load with --reset_optimizer_state")
        return [{**{key: tuple(v) if isinstance(v, list) and key not in ("params", "param_names") else v
                    for key, v in group.items()},
                 **{key: now[key] for key in _IMPLEMENTATION_KEYS if key in now}}
                for group, now in zip(saved, current)]
    except (AttributeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{file} is malformed: {err}") from None


def _load_legacy(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """An old checkpoint (torch.distributed.checkpoint + trainer.pt), read only when trusted: it unpickles."""
    import torch.distributed.checkpoint as dcp

    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    with warnings.catch_warnings():  # DCP's notice that it runs without a process group
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])
    return torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)


def load_full_model_state(model: nn.Module, full: dict[str, torch.Tensor], dist: Dist) -> None:
    """Load whole tensors (held by rank 0 alone when sharded: the others pass {}) into the model (a collective)."""
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True,
                                                               broadcast_from_rank0=dist.sharded))


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) model state on the CPU, on rank 0 (a collective; other ranks get {})."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
