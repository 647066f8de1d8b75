"""Checkpoint formats: HF `OlmoForCausalLM` directories and original allenai/OLMo directories.

HF:       config.json + model.safetensors | model-0000i-of-0000n.safetensors + model.safetensors.index.json
          (| pytorch_model.bin, only when trusted); names `model.layers.{i}.self_attn.q_proj` ...
Original: config.yaml + model.safetensors | model.pt; names `transformer.blocks.{i}.att_proj` ... (our own).
Nothing is unpickled unless the caller says the file is trusted (`trust_pickle=True`): pytorch_model.bin and
model.pt are pickles (torch.save), refused otherwise; even trusted, they are read with `torch.load(weights_only=True)`,
torch's tensor-only unpickler. HF's names are mapped
to ours in `hf_names.py`. This module works on state dicts; it builds a model only through the class passed to
`load_model` (so it never imports `model.py`, which calls into it).
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .errors import CheckpointError, ConfigError
from .hf_names import hf_to_olmo, olmo_to_hf


# ---------------------------------------------------------------------------------------------- reading
def _read_safetensors(files: Iterable[Path]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"checkpoint shard {file} is missing")
        try:
            tensors.update(load_file(str(file)))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"cannot read {file}: {err}") from None
    return tensors


PICKLE_HINT = ("pass trust_pickle=True (CLI: --trust-pickle-checkpoint; training: --trust_pickle_checkpoint) only if "
               "you trust whoever wrote it, or convert the folder to safetensors")


def _read_torch(file: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    if not trust_pickle:
        raise CheckpointError(f"{file} is a pickle (torch.save), which can run code when read; {PICKLE_HINT}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses anything but tensors and plain containers
        raise CheckpointError(f"cannot read {file} as a tensor-only checkpoint: {err}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} does not hold a state dict")
    return state


def read_weights(path: Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, whatever of the supported files holds them (a pickle only when
    `trust_pickle`)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return _read_safetensors(path / s for s in shards)
    if (path / "model.safetensors").is_file():
        return _read_safetensors([path / "model.safetensors"])
    for name in ("pytorch_model.bin", "model.pt"):
        if (path / name).is_file():
            return _read_torch(path / name, trust_pickle)
    raise CheckpointError(f"{path} holds no weights (model.safetensors, a sharded index, pytorch_model.bin "
                          f"or model.pt)")


def load_state(path: str | Path, trust_pickle: bool = False) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, state dict in our names) of an HF or original OLMo checkpoint directory (see `read_weights`)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    config = ModelConfig.from_file(path)
    raw = read_weights(path, trust_pickle)
    if (path / "config.json").is_file():
        return config, hf_to_olmo(raw, config)
    # Original layout; files written by OLMo's trainer prefix every name with "model.".
    state = {name.removeprefix("model."): t for name, t in raw.items()}
    return config, state


def load_model(model_class: Callable[..., torch.nn.Module], path: str | Path, dtype: torch.dtype | None = None,
               device: Any = None, backend: str | None = None, trust_pickle: bool = False) -> torch.nn.Module:
    """`model_class(config, backend=backend, init=False)` (built on the meta device) holding the weights of the
    checkpoint directory `path`, moved to `device` and `dtype`. The model class is passed in (`OLMo.from_pretrained`
    passes itself): this module reads and writes state dicts and does not import the model."""
    config, state = load_state(path, trust_pickle)
    with torch.device("meta"):
        model = model_class(config, backend=backend, init=False)
    check_state(model, state)
    model.load_state_dict(state, assign=True)
    return model.to(device=device, dtype=dtype)


def check_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Raise CheckpointError naming the first missing, unexpected or mis-shaped tensor."""
    expected = {name: p.shape for name, p in model.state_dict().items()}
    for name, shape in expected.items():
        if name not in state:
            raise CheckpointError(f"checkpoint is missing tensor {name!r} (expected shape {tuple(shape)})")
        if state[name].shape != shape:
            raise CheckpointError(f"tensor {name!r} has shape {tuple(state[name].shape)}, expected {tuple(shape)}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise CheckpointError(f"checkpoint has tensors the model does not: {extra[:5]}")


# ---------------------------------------------------------------------------------------------- writing
def _atomic_dir_write(path: Path, write) -> None:
    """Write files into `path/.tmp-<pid>/`, fsync them, then move them into `path` one by one, config last: a
    crash never leaves a config beside half-written weights. Leftovers of crashed writes are removed first."""
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = path / f".tmp-{os.getpid()}"
    tmp.mkdir()
    write(tmp)
    files = sorted(tmp.iterdir(), key=lambda f: f.name.startswith("config"))  # config last
    for file in files:
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    for file in files:
        os.replace(file, path / file.name)
    tmp.rmdir()


def _write_safetensors(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().cpu().contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def save_hf(model: torch.nn.Module, path: str | Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """HF layout: config.json + (sharded) model.safetensors, readable by transformers and by us."""
    config: ModelConfig = model.config
    tensors = olmo_to_hf(model.state_dict(), config)
    dtype = next(iter(tensors.values())).dtype

    def write(folder: Path) -> None:
        _write_safetensors(tensors, folder, max_shard_bytes)
        hf_config = dict(config.to_hf(), torch_dtype=str(dtype).removeprefix("torch."))
        (folder / "config.json").write_text(json.dumps(hf_config, indent=2))

    _atomic_dir_write(Path(path), write)


def save_olmo(model: torch.nn.Module, path: str | Path) -> None:
    """Original OLMo layout: config.yaml (`model:` section) + model.safetensors with OLMo's names."""
    import yaml

    state = model.state_dict()

    def write(folder: Path) -> None:
        _write_safetensors(state, folder, max_shard_bytes=2**62)
        (folder / "config.yaml").write_text(yaml.safe_dump({"model": model.config.to_olmo()}, sort_keys=False))

    _atomic_dir_write(Path(path), write)


__all__ = ["CheckpointError", "ConfigError", "load_model", "load_state", "save_hf", "save_olmo",
           "hf_to_olmo", "olmo_to_hf", "read_weights"]
