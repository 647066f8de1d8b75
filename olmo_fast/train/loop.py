"""The training loop: OLMo's recipe in one `Trainer` - build, restore, step, log, evaluate, checkpoint.

One step: the rank's share of the global batch is split into micro-batches; each adds
`sum(CE over scored tokens) / (tokens in the rank's batch)` to the gradients (OLMo divides by all tokens,
masked or not; FSDP's gradient average over ranks then divides by the global batch); then global-norm
clipping, the scheduled LR, and AdamW. Nothing in the step waits for the device: losses and norms stay on it
until a logging interval reads them all at once.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import resource
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .. import ops
from ..checkpoint import CheckpointError, check_state, load_state
from ..config import ConfigError, ModelConfig
from ..model import OLMo
from ..ops import dispatch
from . import corpus, dist, state
from .config import CHECKPOINT_EVERY, DataConfig, EvaluatorConfig, TrainConfig, save_config
from .data import BatchOrder, TokenDataset, eval_batches
from .optim import build_optimizer
from .schedule import Schedule

# Dense bf16 peak FLOP/s per device, for MFU (a torch device: one MI250X GCD is half the card).
PEAK_FLOPS = {"H100": 989.5e12, "H200": 989.5e12, "A100": 312e12, "MI250X": 383e12 / 2, "MI300X": 1307.4e12}


class TrainingError(RuntimeError):
    pass


def summed_loss(model: OLMo, input_ids: torch.Tensor, labels: torch.Tensor, fused: bool,
                dtype: torch.dtype, check_labels: bool = True) -> torch.Tensor:
    """Sum over positions t of CE(prediction at t, labels[t + 1]), labels -100 skipped; fp32.

    `fused`: `ops.linear_cross_entropy` on the hidden states in `dtype`, never holding the logits.
    `check_labels=False` skips its label range check, a host sync per call (for token files checked up front).
    """
    h = model.hidden_states(input_ids)[:, :-1]
    targets = labels[:, 1:]
    if fused:
        return ops.linear_cross_entropy(h.to(dtype), model.head_weight.to(dtype), targets, reduction="sum",
                                        check_labels=check_labels, backend=model.backend)
    logits = F.linear(h, model.head_weight)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class Trainer:
    def __init__(self, config: TrainConfig, log: Callable[[str], None] = print) -> None:
        self.cfg = config
        self.dist = dist.init(config.device)
        self.log = log if self.dist.main else (lambda _: None)
        self.device = self.dist.device
        self.precision = config.precision or ("amp_bf16" if self.device.type == "cuda" else "fp32")
        self.save_folder = self._save_folder()
        resume_from = state.latest_checkpoint(self.save_folder) if config.try_load_latest_save else None
        self.resumed_from = resume_from
        load_from = resume_from or (Path(config.load_path) if config.load_path else None)
        self.model_config = self._model_config(load_from)
        config.model = self.model_config.to_dict()  # the run's config.yaml records the model it trains
        self.seq_len = self.model_config.max_sequence_length

        self.train_data, self.evaluators = self._data()
        self.order = BatchOrder(len(self.train_data), config.global_train_batch_size,
                                config.data.seed if config.data.seed is not None else config.seed,
                                self.dist.rank, self.dist.world)
        self.tokens_per_batch = config.global_train_batch_size * self.seq_len

        torch.manual_seed(config.seed)  # the same initial weights on every rank
        with torch.device(self.device):
            self.model = OLMo(self.model_config, backend=config.backend, init=load_from is None)
        self.model.validate_inputs = False  # the data was checked up front; the check would sync the device
        weights_only = load_from is not None and not state.is_checkpoint(load_from)
        self._prepare_model()
        if weights_only:  # read by rank 0 only, then scattered to the shards
            weights = {}
            if self.dist.main:
                _, weights = load_state(load_from)
                check_state(self.model, weights)
            state.load_full_model_state(self.model, weights, self.dist)
        self.optimizer = build_optimizer(self.model, config.optimizer, self.device)
        self.schedule = Schedule(config.scheduler, config.optimizer.learning_rate, config.max_grad_norm)

        self.step, self.tokens = 0, 0
        if resume_from is not None:
            self._restore(resume_from, optimizer=True, trainer=True)
            self.log(f"resuming from {resume_from} (step {self.step})")
        elif load_from is not None and not weights_only:
            self._restore(load_from, optimizer=not config.reset_optimizer_state, trainer=not config.reset_trainer_state)
            self.log(f"loaded {load_from}" + (" (trainer state reset)" if config.reset_trainer_state else ""))
        elif weights_only:
            self.log(f"loaded weights from {load_from}" + ("; its optim.pt (OLMo's format) is not read: AdamW starts "
                                                           "fresh" if (load_from / "optim.pt").exists() else ""))
        self.max_steps = self._max_steps()
        self.max_tokens = self._max_tokens()

    # ------------------------------------------------------------------ setup
    def _save_folder(self) -> Path:
        cfg = self.cfg
        stamp = self.dist.broadcast(datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"))
        folder = Path(cfg.save_folder) if cfg.save_folder else Path("runs") / (cfg.run_name or stamp)
        has_checkpoints = self.dist.broadcast(folder.is_dir() and any(folder.glob("step*")))
        if has_checkpoints and not (cfg.try_load_latest_save or cfg.save_overwrite):
            raise ConfigError(f"save_folder {folder} already holds checkpoints: pass --resume to continue "
                                  f"the run, or --save_overwrite to start over there")
        return folder  # made by fit(), once the data and the model have passed their checks

    def _model_config(self, load_from: Path | None) -> ModelConfig:
        """A training checkpoint's model (which a `model` setting must equal), else the `model` setting, else the
        model of the weights loaded."""
        asked = self.cfg.model_config() if self.cfg.model is not None or load_from is None else None
        if load_from is None:
            return asked
        if not load_from.is_dir():
            raise CheckpointError(f"load_path {load_from} is not a folder (a stepN checkpoint or an HF / OLMo model)")
        if state.is_checkpoint(load_from):
            return state.checkpoint_model_config(load_from, asked, self.cfg.trust_pickle_checkpoint)
        return asked or ModelConfig.from_file(load_from)

    def _dataset(self, data: DataConfig) -> TokenDataset:
        return TokenDataset(data.all_paths(), self.seq_len, data.memmap_dtype, data.label_mask_paths,
                            self.model_config.vocab_size, data.validate)

    def _data(self) -> tuple[TokenDataset, list[tuple[EvaluatorConfig, TokenDataset]]]:
        cfg = self.cfg
        evaluators = list(cfg.evaluators)
        for ev in [e for e in evaluators if e.type != "lm" or not e.data.all_paths()]:
            warnings.warn(f"skipping evaluator {ev.label!r}: only language-model loss on token files (type lm, "
                          f"data.paths or data.datasets) is implemented", stacklevel=2)
        evaluators = [e for e in evaluators if e.type == "lm" and e.data.all_paths()]
        if not cfg.data.all_paths():  # the built-in corpus, tokenized once by rank 0
            if self.dist.main:
                train, val = corpus.build()
            self.dist.barrier()
            train, val = corpus.build()
            cfg.data.paths = [str(train)]
            if not evaluators:
                evaluators = [EvaluatorConfig(label="corpus-val", data=DataConfig(paths=[str(val)]),
                                              subset_num_batches=4)]
            self.log(f"data: the built-in corpus ({train.stat().st_size // 2:,} tokens of OLMo eval-task text)")
        return self._dataset(cfg.data), [(e, self._dataset(e.data)) for e in evaluators]

    def _prepare_model(self) -> None:
        cfg, blocks = self.cfg, self.model.transformer["blocks"]
        fused = cfg.fused_loss
        if fused is None:  # where a fused kernel exists for this device
            fused = dispatch.resolve("cross_entropy_chunk", cfg.backend, self.device) != "torch"
        dtype = torch.bfloat16 if self.precision == "amp_bf16" else torch.float32
        # Token files scanned for out-of-vocabulary ids at load time need no per-micro-batch check (a host sync).
        checked = cfg.data.validate and all(ev.data.validate for ev, _ in self.evaluators)
        # The model's forward becomes the summed loss: FSDP's hooks run around it as around any forward.
        self.model.forward = functools.partial(summed_loss, self.model, fused=fused, dtype=dtype,
                                               check_labels=not checked)
        if cfg.activation_checkpointing:
            every = 1 if cfg.activation_checkpointing is True else CHECKPOINT_EVERY[cfg.activation_checkpointing]
            for block in list(blocks)[::every]:
                block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        if cfg.compile:
            options = {k: v for k, v in (cfg.compile if isinstance(cfg.compile, dict) else {}).items()
                       if k in ("mode", "fullgraph", "dynamic", "backend")}
            for block in blocks:
                block.compile(**options)
        if self.dist.sharded:
            dist.shard(self.model, cfg.fsdp.precision if self.precision == "amp_bf16" else "full")

    def _restore(self, path: Path, optimizer: bool, trainer: bool) -> None:
        saved = state.load(path, self.model, self.optimizer if optimizer else None, self.cfg.trust_pickle_checkpoint)
        if not trainer:
            return
        self.step, self.tokens = int(saved["global_step"]), int(saved["global_train_tokens_seen"])
        self.order.load_state_dict(saved["data"])
        torch.set_rng_state(saved["rng"])

    def _max_steps(self) -> int:
        kind, amount = self.cfg.max_duration_parsed()
        if kind == "steps":
            return int(amount)
        if kind == "tokens":
            return self.step + math.ceil(max(amount - self.tokens, 0) / self.tokens_per_batch)
        return math.ceil(amount * self.order.batches_per_epoch)

    def _max_tokens(self) -> int:
        kind, amount = self.cfg.max_duration_parsed()
        return int(amount) if kind == "tokens" else self.max_steps * self.tokens_per_batch

    # ------------------------------------------------------------------ one step
    def _schedule_position(self) -> tuple[int, int]:
        """(where the run is, how long it is) in the schedule's units: steps or tokens."""
        if self.cfg.scheduler.units == "steps":
            return self.step, self.max_steps
        return self.tokens, self.max_tokens

    def _autocast(self):
        if self.precision == "amp_bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _loss_sum(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.model(input_ids, labels)  # summed_loss (set in _prepare_model)

    def train_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on this rank's part of a global batch; returns (loss, grad norm) on the device."""
        if self.device.type == "cuda":
            batch = {k: v.pin_memory() for k, v in batch.items()}
        ids = batch["input_ids"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        micro = ids.split(self.cfg.device_train_microbatch_size)
        micro_labels = labels.split(self.cfg.device_train_microbatch_size)
        loss = torch.zeros((), device=self.device)
        for i, (m_ids, m_labels) in enumerate(zip(micro, micro_labels)):
            if self.dist.sharded:  # reduce-scatter gradients once, after the last micro-batch
                self.model.set_requires_gradient_sync(i == len(micro) - 1)
            part = self._loss_sum(m_ids, m_labels) / ids.numel()
            part.backward()
            loss += part.detach()
        t, total = self._schedule_position()
        limit = self.schedule.grad_norm_limit(t)
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, limit if limit is not None else math.inf, foreach=True)
        lr = self.schedule.lr(t, total)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, norm

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        out = {}
        for ev, data in self.evaluators:
            total = torch.zeros(2, dtype=torch.float64, device=self.device)  # [loss sum, scored tokens]
            for batch in eval_batches(data, self.cfg.device_train_microbatch_size, self.dist.rank,
                                      self.dist.world, ev.subset_num_batches):
                ids = batch["input_ids"].to(self.device)
                labels = batch["labels"].to(self.device)
                total[0] += self._loss_sum(ids, labels).double()
                total[1] += (labels[:, 1:] != -100).sum()
            total = self.dist.sum(total)
            out[f"eval/{ev.label}/loss"] = (total[0] / total[1].clamp(min=1)).item()
        self.model.train()
        return out

    # ------------------------------------------------------------------ checkpoints
    def trainer_state(self) -> dict[str, Any]:
        return {"global_step": self.step, "global_train_tokens_seen": self.tokens, "data": self.order.state_dict(),
                "rng": torch.get_rng_state(), "world_size": self.dist.world}

    def save_checkpoint(self) -> Path:
        return state.save(self.save_folder, self.step, self.model, self.optimizer, self.trainer_state(),
                          self.model_config, self.cfg.save_num_checkpoints_to_keep, self.dist)

    def export_hf(self) -> Path | None:
        full = state.full_model_state(self.model)
        path = self.save_folder / "hf"
        if self.dist.main:
            with torch.device("meta"):
                model = OLMo(self.model_config, init=False)
            model.load_state_dict(full, assign=True)
            model.save_pretrained(path)
        self.dist.barrier()
        return path

    # ------------------------------------------------------------------ the loop
    def _write_metrics(self, record: dict[str, Any]) -> None:
        if self.dist.main:
            with open(self.save_folder / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def fit(self) -> dict[str, Any]:
        cfg, main = self.cfg, self.dist.main
        if main:
            if cfg.save_overwrite and self.resumed_from is None:  # start over: no stale checkpoints or metrics
                state.clear_run(self.save_folder)
            self.save_folder.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.save_folder / "config.yaml")
            n = self.model_config.num_params()
            self.log(f"model: {n / 1e6:.1f}M parameters, context {self.seq_len}; device {self.device}, "
                     f"{self.dist.world} process(es), precision {self.precision}; {len(self.train_data):,} "
                     f"instances; {self.max_steps} steps of {self.tokens_per_batch:,} tokens")
            self.log(f"run folder: {self.save_folder}")
        stop_at = min(self.max_steps, cfg.stop_at) if cfg.stop_at is not None else self.max_steps
        peak = cfg.flops_peak or device_peak_flops(self.device)
        flops_per_token = self.model_config.flops_per_token(self.seq_len)
        bar = _progress(main, self.step, stop_at)
        start = time.monotonic()
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        last_time, last_tokens = time.monotonic(), self.tokens
        last: dict[str, Any] = {}
        evaluated_at = None
        while self.step < stop_at:
            batch = self.train_data.batch(self.order.next())
            self.step += 1
            self.tokens += self.tokens_per_batch
            pending.append(self.train_step(batch))
            bar.update(1)
            out_of_time = False
            if self.step % cfg.console_log_interval == 0 or self.step == stop_at:
                last.update(self._log_interval(pending, last_time, last_tokens, peak, flops_per_token))
                pending.clear()
                last_time, last_tokens = time.monotonic(), self.tokens
                bar.set_postfix(loss=f"{last['train/loss']:.4f}")
                if cfg.time_limit is not None:  # rank 0's clock decides, so that all ranks stop together
                    out_of_time = self.dist.broadcast(time.monotonic() - start > cfg.time_limit)
            if cfg.eval_interval and self.evaluators and self.step % cfg.eval_interval == 0:
                last.update(self._log_eval())
                evaluated_at = self.step
            if (cfg.save_interval and self.step % cfg.save_interval == 0) or self.step == stop_at or out_of_time:
                path = self.save_checkpoint()
                if main:
                    bar.write(f"saved checkpoint {path}")
            if out_of_time:
                self.log(f"time_limit of {cfg.time_limit}s reached at step {self.step}")
                break
        bar.close()
        if self.evaluators and evaluated_at != self.step:
            last.update(self._log_eval())
        if cfg.export_hf:
            path = self.export_hf()
            if main:
                self.log(f"HF weights: {path}")
        if main:
            self.log(f"done: {self.step} steps, {self.tokens:,} tokens in {time.monotonic() - start:.1f}s; "
                     f"run written to {self.save_folder}")
        return last

    def _log_interval(self, pending, since: float, tokens_before: int, peak: float | None,
                      flops_per_token: float) -> dict[str, Any]:
        losses = self.dist.mean(torch.stack([loss for loss, _ in pending]))
        norm = pending[-1][1]
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        values = torch.cat([losses.float(), norm.float().reshape(1)]).tolist()  # the one host sync
        losses, norm = values[:-1], values[-1]
        if any(not math.isfinite(v) for v in losses):
            raise TrainingError(f"loss is {losses[-1]} at step {self.step}")
        elapsed = max(time.monotonic() - since, 1e-9)
        tps = (self.tokens - tokens_before) / elapsed / self.dist.world  # per device
        t, _ = self._schedule_position()
        record = {"step": self.step, "tokens": self.tokens, "train/loss": sum(losses) / len(losses),
                  "train/step_losses": losses, "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": norm,
                  "grad_norm_limit": self.schedule.grad_norm_limit(t), "tokens_per_sec_per_device": tps,
                  "mfu": tps * flops_per_token / peak if peak else None, "memory_gib": memory_gib(self.device)}
        self._write_metrics(record)
        if self.dist.main:
            mfu = f" | MFU {100 * record['mfu']:.1f}%" if record["mfu"] is not None else ""
            _write(f"step {self.step}/{self.max_steps} | loss {record['train/loss']:.4f} | lr {record['lr']:.3g} | "
                   f"grad norm {norm:.3f} | {tps:,.0f} tok/s/device{mfu} | mem {record['memory_gib']:.2f} GiB")
        return record

    def _log_eval(self) -> dict[str, float]:
        metrics = self.evaluate()
        self._write_metrics({"step": self.step, "tokens": self.tokens, **metrics})
        if self.dist.main:
            _write(f"step {self.step} | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    def close(self) -> None:
        self.dist.close()


def _progress(enabled: bool, initial: int, total: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=None if enabled else True)


def _write(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(line)
