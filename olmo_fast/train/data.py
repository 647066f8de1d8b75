"""OLMo's token files: headerless memory-mapped token arrays cut into fixed-length instances, in a seeded order.

Each file holds raw token ids (uint16 by default, no `.npy` header), documents already joined with EOS; it is cut
into non-overlapping windows of `seq_len` tokens and its tail is dropped. An optional parallel `label_mask` file
holds one bool byte per token (False: not scored). The instance order of epoch `e` is
`numpy.random.Generator(PCG64(seed + e))`'s shuffle of all instance indices; global batch `s` is the slice
`[s*G, (s+1)*G)` of that order and rank `r` of `W` takes every W-th instance of it from `r` (OLMo deals the
order round-robin the same way), so a run sees the same instances whatever the number of ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


class DataError(ValueError):
    """A token file that cannot be trained on (wrong size, dtype, ids, too short)."""


_SCAN_CHUNK = 1 << 24  # tokens per chunk when scanning a file for its largest id


@dataclass
class _File:
    path: Path
    tokens: np.memmap
    mask: np.memmap | None
    first: int  # index of this file's first instance
    count: int  # instances in this file


class TokenDataset:
    """Instances of `seq_len` tokens from several token files (and optional label masks)."""

    def __init__(self, paths: list[str | Path], seq_len: int, dtype: str = "uint16",
                 label_mask_paths: list[str | Path] | None = None, vocab_size: int | None = None,
                 validate: bool = True) -> None:
        if not paths:
            raise DataError("no token files given (data.paths is empty)")
        if label_mask_paths is not None and len(label_mask_paths) != len(paths):
            raise DataError(f"{len(label_mask_paths)} label mask files for {len(paths)} token files")
        self.seq_len, self.dtype = seq_len, np.dtype(dtype)
        self.files: list[_File] = []
        first = 0
        for i, path in enumerate(paths):
            tokens = self._open(Path(path), self.dtype, "token")
            count = len(tokens) // seq_len
            if count == 0:
                raise DataError(f"{path} holds {len(tokens)} tokens, fewer than one instance of {seq_len}")
            mask = None
            if label_mask_paths is not None:
                mask = self._open(Path(label_mask_paths[i]), np.dtype(np.bool_), "label mask")
                if len(mask) != len(tokens):
                    raise DataError(f"label mask {label_mask_paths[i]} has {len(mask)} entries for the "
                                    f"{len(tokens)} tokens of {path}")
            if validate:
                self._check_ids(Path(path), tokens, vocab_size)
            self.files.append(_File(Path(path), tokens, mask, first, count))
            first += count
        self._starts = np.array([f.first for f in self.files])
        self.has_mask = label_mask_paths is not None

    @staticmethod
    def _open(path: Path, dtype: np.dtype, what: str) -> np.memmap:
        if not path.is_file():
            raise DataError(f"{what} file {path} does not exist")
        size = path.stat().st_size
        if size % dtype.itemsize:
            raise DataError(f"{what} file {path} has {size} bytes, not a multiple of {dtype.itemsize} "
                            f"({dtype.name}); is data.memmap_dtype right?")
        if size == 0:
            raise DataError(f"{what} file {path} is empty")
        return np.memmap(path, dtype=dtype, mode="r")

    def _check_ids(self, path: Path, tokens: np.memmap, vocab_size: int | None) -> None:
        head = np.asarray(tokens[: min(len(tokens), _SCAN_CHUNK)])
        if self.dtype == np.uint16 and len(head) >= 64 and not head[1::2].any() and head[0::2].any():
            raise DataError(f"{path}: every second uint16 is 0 - this looks like uint32 data; "
                            f"set data.memmap_dtype=uint32")
        if vocab_size is None:
            return
        for start in range(0, len(tokens), _SCAN_CHUNK):
            top = int(tokens[start:start + _SCAN_CHUNK].max())
            if top >= vocab_size:
                hint = " (data.memmap_dtype too wide?)" if top >= 2**16 and self.dtype != np.uint16 else ""
                raise DataError(f"{path} holds token id {top} >= the model's vocab_size {vocab_size}{hint}")

    def __len__(self) -> int:
        return int(self._starts[-1]) + self.files[-1].count

    def instance(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        f = self.files[int(np.searchsorted(self._starts, index, side="right")) - 1]
        start = (index - f.first) * self.seq_len
        ids = np.asarray(f.tokens[start:start + self.seq_len], dtype=np.int64)
        mask = None if f.mask is None else np.asarray(f.mask[start:start + self.seq_len], dtype=np.bool_)
        return ids, mask

    def batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        """`{"input_ids": [B, T] int64, "labels": [B, T] int64}` with -100 where the label mask is False."""
        pairs = [self.instance(int(i)) for i in indices]
        ids = torch.from_numpy(np.stack([p[0] for p in pairs]))
        labels = ids.clone()
        if self.has_mask:
            labels.masked_fill_(~torch.from_numpy(np.stack([p[1] for p in pairs])), -100)
        return {"input_ids": ids, "labels": labels}


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """OLMo's order of `n` instances in `epoch`: a PCG64(seed + epoch) shuffle of `arange(n)`."""
    indices = np.arange(n, dtype=np.uint32 if n < 2**32 - 1 else np.uint64)
    np.random.Generator(np.random.PCG64(seed=seed + epoch)).shuffle(indices)
    return indices


class BatchOrder:
    """Deals global batches of `global_batch` instances to this rank, in epoch order; resumable."""

    def __init__(self, size: int, global_batch: int, seed: int, rank: int = 0, world: int = 1) -> None:
        if global_batch % world:
            raise DataError(f"global_train_batch_size {global_batch} is not divisible by {world} processes")
        if size < global_batch:
            raise DataError(f"the data holds {size} instances, fewer than one global batch of {global_batch}")
        self.size, self.global_batch, self.seed, self.rank, self.world = size, global_batch, seed, rank, world
        self.epoch, self.position = 0, 0  # position: instances of this epoch already dealt (all ranks)
        self._order: np.ndarray | None = None

    @property
    def batches_per_epoch(self) -> int:
        return self.size // self.global_batch

    def next(self) -> np.ndarray:
        """This rank's instance indices of the next global batch."""
        if self.position + self.global_batch > self.size:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = epoch_order(self.size, self.seed, self.epoch)
        batch = self._order[self.position:self.position + self.global_batch]
        self.position += self.global_batch
        return batch[self.rank::self.world]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "size": self.size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["size"] != self.size or state["seed"] != self.seed:
            raise DataError(f"the checkpoint's data order ({state['size']} instances, seed {state['seed']}) does "
                            f"not match this run's ({self.size} instances, seed {self.seed}); "
                            f"use --reset_trainer_state to start the data over")
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None


def eval_steps(dataset: TokenDataset, batch_size: int, world: int, max_batches: int | None = None) -> int:
    """How many eval batches of `batch_size` per rank the data gives (DataError if not even one)."""
    per_step = batch_size * world
    steps = len(dataset) // per_step
    if steps == 0:
        raise DataError(f"eval data holds {len(dataset)} instances, fewer than one batch of {per_step}")
    return steps if max_batches is None else min(steps, max_batches)


def eval_batches(dataset: TokenDataset, batch_size: int, rank: int, world: int,
                 max_batches: int | None = None):
    """Sequential eval batches, instances dealt round-robin to ranks (each rank gets the same number)."""
    per_step = batch_size * world
    for s in range(eval_steps(dataset, batch_size, world, max_batches)):
        yield dataset.batch(np.arange(s * per_step + rank, (s + 1) * per_step, world))
