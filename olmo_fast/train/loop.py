"""The training loop: OLMo's recipe in one `Trainer` - build, restore, step, log, evaluate, checkpoint.

One step: the rank's share of the global batch is split into micro-batches; each adds
`sum(CE over scored tokens) / (tokens in the rank's batch)` to the gradients (OLMo divides by all tokens,
masked or not; FSDP's gradient average over ranks then divides by the global batch); then global-norm
clipping, the scheduled LR, and AdamW. Nothing in the step waits for the device: losses and norms stay on it
until a logging interval reads them all at once.

Nothing silent, nothing lost: settings, backend, data and eval sets are checked before any work; a non-finite
loss or gradient norm stops the run naming its step, and a checkpoint is written only of finite parameters;
SIGINT / SIGTERM finish the step, save, and exit (128 + the signal; `--resume` continues); a failed write
(a full disk) ends with one line naming the path; a resumed run's metrics.jsonl holds each step once.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import resource
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from ..checkpoint import CheckpointError, check_state, load_state
from ..config import ConfigError, ModelConfig
from ..eval import DownstreamEvaluator, TaskError
from ..model import OLMo
from ..ops import dispatch
from ..tokenizer import load_tokenizer, olmo_tokenizer_name
from . import corpus, dist, state
from .config import CHECKPOINT_EVERY, DataConfig, EvaluatorConfig, TrainConfig, save_config
from .data import BatchOrder, DataError, TokenDataset, eval_batches, eval_steps
from .optim import build_optimizer
from .schedule import Schedule

# Dense bf16 peak FLOP/s per device, for MFU (a torch device: one MI250X GCD is half the card).
PEAK_FLOPS = {"H100": 989.5e12, "H200": 989.5e12, "A100": 312e12, "MI250X": 383e12 / 2, "MI300X": 1307.4e12}
# The kernels of one training step (model.py's ops, forward and backward): an explicit backend must have them all.
STEP_KERNELS = ("layer_norm_fwd", "layer_norm_bwd", "qkv_rope_fwd", "qkv_rope_bwd", "attention_fwd", "attention_bwd",
                "swiglu_fwd", "swiglu_bwd")
METRICS_FILE = "metrics.jsonl"


class TrainingError(RuntimeError):
    pass


class Interrupted(TrainingError):
    """SIGINT / SIGTERM stopped the run after a step, whose checkpoint was written; `exit_code` is 128 + signal."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


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
        config.validate()
        self.cfg = config
        self.dist = dist.init(config.device)
        self.log = log if self.dist.main else (lambda _: None)
        self.device = self.dist.device
        self._check_batch_sizes()
        self.fused_loss = self._fused_loss()
        self.precision = config.precision or ("amp_bf16" if self.device.type == "cuda" else "fp32")
        self.save_folder = self._save_folder()
        resume_from = state.latest_checkpoint(self.save_folder) if config.try_load_latest_save else None
        self.resumed_from = resume_from
        load_from = resume_from or (Path(config.load_path) if config.load_path else None)
        self.model_config = self._model_config(load_from)
        config.model = self.model_config.to_dict()  # the run's config.yaml records the model it trains
        self.seq_len = self.model_config.max_sequence_length

        self.train_data, self.evaluators = self._data()
        self.downstream = self._downstream_tasks()
        self.order = BatchOrder(len(self.train_data), config.global_train_batch_size,
                                config.data.seed if config.data.seed is not None else config.seed,
                                self.dist.rank, self.dist.world)
        self.tokens_per_batch = config.global_train_batch_size * self.seq_len

        torch.manual_seed(config.seed)  # the same initial weights on every rank
        with torch.device(self.device):
            self.model = OLMo(self.model_config, backend=config.backend, init=load_from is None)
        weights_only = load_from is not None and not state.is_checkpoint(load_from)
        self._prepare_model()
        if weights_only:  # read by rank 0 only, then scattered to the shards
            weights = {}
            if self.dist.main:
                _, weights = load_state(load_from, self.cfg.trust_pickle_checkpoint)
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
        self._warn_long_warmup()

    # ------------------------------------------------------------------ setup
    def _check_batch_sizes(self) -> None:
        g, m, world = self.cfg.global_train_batch_size, self.cfg.device_train_microbatch_size, self.dist.world
        if g % world:
            raise ConfigError(f"global_train_batch_size {g} is not divisible by the {world} processes")
        if (g // world) % m:
            raise ConfigError(f"device_train_microbatch_size {m} does not divide the {g // world} instances each "
                              f"process takes per step (global_train_batch_size {g} / {world} processes)")

    def _fused_loss(self) -> bool:
        """Whether the loss runs fused (`fused_loss`, or where a fused kernel exists); an explicit backend must
        have every kernel of the step (else ConfigError, before any work)."""
        backend, wanted = self.cfg.backend, self.cfg.fused_loss
        if wanted is None:
            chosen = backend or dispatch.resolve("cross_entropy_chunk", None, self.device)
            wanted = chosen != "torch" and dispatch.has_kernel("cross_entropy_chunk", chosen, self.device.type)
        if backend not in (None, "torch"):
            try:
                for op in STEP_KERNELS + (("cross_entropy_chunk",) if wanted else ()):
                    dispatch.kernel(op, backend, self.device.type)
            except dispatch.BackendError as err:
                raise ConfigError(f"backend {backend!r} cannot train on {self.device.type}: {err}; leave backend "
                                  f"unset to use the best kernel of each op") from None
        return wanted

    def _warn_long_warmup(self) -> None:
        sched = self.cfg.scheduler
        _, total = self._schedule_position()
        length = sched.t_max if sched.t_max is not None else total
        if sched.name != "constant" and sched.t_warmup > length:  # a smoke test's short run: not an error
            warnings.warn(f"scheduler.t_warmup {sched.t_warmup:g} is longer than the schedule ({length:g} "
                          f"{sched.units}): the learning rate never reaches optimizer.learning_rate", stacklevel=2)

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
        for ev in [e for e in evaluators if e.type != "downstream" and not (e.type == "lm" and e.data.all_paths())]:
            warnings.warn(f"skipping evaluator {ev.label!r}: only language-model loss on token files (type lm, "
                          f"data.paths or data.datasets) and downstream tasks are implemented", stacklevel=2)
        evaluators = [e for e in evaluators if e.type == "lm" and e.data.all_paths()]
        if not cfg.data.all_paths():  # the built-in corpus in the model's tokenizer, tokenized once by rank 0
            name = olmo_tokenizer_name(self.model_config.eos_token_id)
            if self.dist.main:
                train, val = corpus.build(tokenizer_name=name)
            self.dist.barrier()
            train, val = corpus.build(tokenizer_name=name)
            cfg.data.paths, cfg.data.memmap_dtype = [str(train)], corpus.memmap_dtype(name)
            if not evaluators:
                evaluators = [EvaluatorConfig(label="corpus-val", subset_num_batches=4,
                                              data=DataConfig(paths=[str(val)], memmap_dtype=cfg.data.memmap_dtype))]
            tokens = train.stat().st_size // np.dtype(cfg.data.memmap_dtype).itemsize
            self.log(f"data: the built-in corpus ({tokens:,} tokens of OLMo eval-task text, {name})")
        return self._dataset(cfg.data), [(e, self._eval_dataset(e)) for e in evaluators]

    def _downstream_tasks(self) -> list[DownstreamEvaluator]:
        """The `type: downstream` evaluators, their tasks checked and tokenized now (a ConfigError before any
        work), once for the whole run."""
        tasks = [ev for ev in self.cfg.evaluators if ev.type == "downstream"]
        if not tasks:
            return []
        # the tasks are tokenized with the model's OLMo tokenizer: its ids must be the model's
        tokenizer = load_tokenizer(name=olmo_tokenizer_name(self.model_config.eos_token_id))
        ids, rows = tokenizer.get_vocab_size(), self.model_config.embedding_size
        if ids > rows:
            raise ConfigError(f"evaluator {tasks[0].label!r}: OLMo's tokenizer has {ids} ids, more than the "
                              f"model's {rows} embedding rows (downstream tasks need a model of OLMo's vocabulary)")
        evaluators = []
        for ev in tasks:
            try:
                evaluators.append(DownstreamEvaluator(ev.label, tokenizer, limit=ev.subset_num_batches, vocab_size=rows,
                                                      max_length=self.model_config.max_sequence_length))
            except (TaskError, ValueError) as err:
                raise ConfigError(f"evaluator {ev.label!r}: {err}") from None
        return evaluators

    def _eval_dataset(self, ev: EvaluatorConfig) -> TokenDataset:
        """An evaluator's data, checked to hold at least one eval batch now rather than at the first eval."""
        data = self._dataset(ev.data)
        try:
            eval_steps(data, self.cfg.device_train_microbatch_size, self.dist.world)
        except DataError as err:
            raise DataError(f"evaluator {ev.label!r}: {err} (device_train_microbatch_size x processes)") from None
        return data

    def _prepare_model(self) -> None:
        cfg, blocks = self.cfg, self.model.transformer["blocks"]
        # Token files scanned for out-of-vocabulary ids at load time need no per-micro-batch check (a host sync).
        self.check_batches = not (cfg.data.validate and all(ev.data.validate for ev, _ in self.evaluators))
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

    def _loss_sum(self, input_ids: torch.Tensor, labels: torch.Tensor, z_loss: float = 0.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, z part): the sum over positions t of CE(prediction at t, labels[t + 1]) (+ `z_loss` x
        logsumexp^2 of its logits), -100 skipped, fp32, and the z-loss part of it alone (detached; 0 without a
        z-loss, which is then never computed). `OLMo.forward`'s loss: fused, the logits are never held."""
        with self._autocast():
            out = self.model(input_ids, labels, reduction="sum", fused=self.fused_loss,
                             check_inputs=self.check_batches, z_loss=z_loss, return_z_loss=bool(z_loss))
        loss = out[1]
        return loss, out[2] if z_loss else torch.zeros((), device=loss.device)

    def train_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step on this rank's part of a global batch; returns (loss, grad norm, the loss's z-loss
        part) on the device."""
        if self.device.type == "cuda":
            batch = {k: v.pin_memory() for k, v in batch.items()}
        ids = batch["input_ids"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        micro = ids.split(self.cfg.device_train_microbatch_size)
        micro_labels = labels.split(self.cfg.device_train_microbatch_size)
        loss, z_loss = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        for i, (m_ids, m_labels) in enumerate(zip(micro, micro_labels)):
            if self.dist.sharded:  # reduce-scatter gradients once, after the last micro-batch
                self.model.set_requires_gradient_sync(i == len(micro) - 1)
            part, z_part = self._loss_sum(m_ids, m_labels, z_loss=self.cfg.z_loss_multiplier or 0.0)
            (part / ids.numel()).backward()
            loss += part.detach() / ids.numel()
            z_loss += z_part / ids.numel()
        t, total = self._schedule_position()
        limit = self.schedule.grad_norm_limit(t)
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, limit if limit is not None else math.inf, foreach=True)
        lr = self.schedule.lr(t, total)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, norm, z_loss

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
                total[0] += self._loss_sum(ids, labels)[0].double()
                total[1] += (labels[:, 1:] != -100).sum()
            total = self.dist.sum(total)
            out[f"eval/{ev.label}/loss"] = (total[0] / total[1].clamp(min=1)).item()
        for evaluator in self.downstream:  # every process scores the same documents (FSDP: through the root module)
            with self._autocast():
                out.update(evaluator(self.model, shared=self.dist.world == 1))
        self.model.train()
        return out

    # ------------------------------------------------------------------ checkpoints
    def trainer_state(self) -> dict[str, Any]:
        return {"global_step": self.step, "global_train_tokens_seen": self.tokens, "data": self.order.state_dict(),
                "rng": torch.get_rng_state(), "world_size": self.dist.world}

    def save_checkpoint(self) -> Path:
        """Write `step<N>/` (a collective), only of finite parameters (else TrainingError, nothing written)."""
        self._check_finite_parameters()
        path = self.save_folder / f"step{self.step}"
        with _writing("checkpoint", path):
            return state.save(self.save_folder, self.step, self.model, self.optimizer, self.trainer_state(),
                              self.model_config, self.cfg.save_num_checkpoints_to_keep, self.dist)

    def _check_finite_parameters(self) -> None:
        named = [(n, p.to_local() if hasattr(p, "to_local") else p) for n, p in self.model.named_parameters()]
        bad = torch.stack([~torch.isfinite(p.detach()).all() for _, p in named])
        if self.dist.sum(bad.any().int()).item():  # any rank's shard
            names = [n for (n, _), b in zip(named, bad.tolist()) if b]
            raise TrainingError(f"parameters are not finite after step {self.step}"
                                + (f" ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" if names else "")
                                + ": no checkpoint written")

    def export_hf(self) -> Path | None:
        full = state.full_model_state(self.model)
        path = self.save_folder / "hf"
        if self.dist.main:
            with torch.device("meta"):
                model = OLMo(self.model_config, init=False)
            model.load_state_dict(full, assign=True)
            with _writing("HF export", path):
                model.save_pretrained(path)
        self.dist.barrier()
        return path

    # ------------------------------------------------------------------ the run folder
    def _open_run_folder(self) -> None:
        """Make the run folder (rank 0): its config.yaml, and metrics.jsonl cut back to this run's start."""
        cfg = self.cfg
        if not self.dist.main:
            return
        with _writing("run folder", self.save_folder):
            if cfg.save_overwrite and self.resumed_from is None:  # start over: no stale checkpoints or metrics
                state.clear_run(self.save_folder)
            self.save_folder.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.save_folder / "config.yaml")
            self._truncate_metrics()
        n = self.model_config.num_params()
        self.log(f"model: {n / 1e6:.1f}M parameters, context {self.seq_len}; device {self.device}, "
                 f"{self.dist.world} process(es), precision {self.precision}; {len(self.train_data):,} "
                 f"instances; {self.max_steps} steps of {self.tokens_per_batch:,} tokens")
        self.log(f"run folder: {self.save_folder}")

    def _truncate_metrics(self) -> None:
        """Cut metrics.jsonl (appended in step order) before its first record past the step this run starts
        from - all of a fresh run's, those after a resumed run's checkpoint, a torn line of a killed run - so
        that every step is recorded once. One truncate call: the file is never left half rewritten."""
        path = self.save_folder / METRICS_FILE
        if not path.is_file():
            return
        offset = 0
        with open(path, "rb") as fh:
            for line in fh:
                step = _record_step(line)
                if step is None or step > self.step or not line.endswith(b"\n"):
                    os.truncate(path, offset)
                    return
                offset += len(line)

    def _write_metrics(self, record: dict[str, Any]) -> None:
        if self.dist.main:
            path = self.save_folder / METRICS_FILE
            with _writing("metrics", path), open(path, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        """Train to the end of the schedule (or stop_at / time_limit), then evaluate and export; the last metrics.
        Raises Interrupted after SIGINT / SIGTERM (with the step's checkpoint written), TrainingError on a
        non-finite loss or a failed write."""
        cfg, main = self.cfg, self.dist.main
        self._open_run_folder()
        stop_at = min(self.max_steps, cfg.stop_at) if cfg.stop_at is not None else self.max_steps
        start = time.monotonic()
        with _progress(main, self.step, stop_at) as bar, _StopSignals(announce=main) as signals:
            last, stop = self._loop(stop_at, start, bar, signals)
        if isinstance(stop, signal.Signals):
            raise Interrupted(stop, f"{stop.name} after step {self.step}: checkpoint written to "
                                    f"{self.save_folder / f'step{self.step}'}; continue with --resume")
        if stop == "time":
            self.log(f"time_limit of {cfg.time_limit}s reached at step {self.step}")
        if (self.evaluators or self.downstream) and not self._eval_due():
            last.update(self._log_eval())
        if cfg.export_hf:
            path = self.export_hf()
            if main:
                self.log(f"HF weights: {path}")
        if main:
            self.log(f"done: {self.step} steps, {self.tokens:,} tokens in {time.monotonic() - start:.1f}s; "
                     f"run written to {self.save_folder}")
        return last

    def _eval_due(self) -> bool:
        return bool(self.cfg.eval_interval and (self.evaluators or self.downstream)
                    and self.step % self.cfg.eval_interval == 0)

    def _loop(self, stop_at: int, start: float, bar, signals: _StopSignals) -> tuple[dict[str, Any], Any]:
        """Steps until `stop_at` or a stop; returns (the last metrics, why it stopped early: a signal, "time" or
        None). Every checkpoint step is also a logging step, so its losses are checked before it is written."""
        cfg = self.cfg
        peak = cfg.flops_peak or device_peak_flops(self.device)
        flops_per_token = self.model_config.flops_per_token(self.seq_len)
        pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        last_time, last_tokens = time.monotonic(), self.tokens
        last: dict[str, Any] = {}
        stop, vote = None, _StopVote(self.dist)
        while self.step < stop_at and stop is None:
            batch = self.train_data.batch(self.order.next())
            self.step += 1
            self.tokens += self.tokens_per_batch
            pending.append(self.train_step(batch))
            bar.update(1)
            late = cfg.time_limit is not None and time.monotonic() - start > cfg.time_limit
            stop = vote(signals.received, late)
            save_due = bool(cfg.save_interval and self.step % cfg.save_interval == 0) or self.step == stop_at
            if save_due or stop or self.step % cfg.console_log_interval == 0:
                last.update(self._log_interval(pending, last_time, last_tokens, peak, flops_per_token))
                pending.clear()
                last_time, last_tokens = time.monotonic(), self.tokens
                bar.set_postfix(loss=f"{last['train/loss']:.4f}")
            if self._eval_due():
                last.update(self._log_eval())
            if save_due or stop:
                path = self.save_checkpoint()
                if self.dist.main:
                    bar.write(f"saved checkpoint {path}")
        return last, stop

    def _log_interval(self, pending, since: float, tokens_before: int, peak: float | None,
                      flops_per_token: float) -> dict[str, Any]:
        """Log the steps of `pending` (the one host sync of the interval); TrainingError at the first step whose
        loss or gradient norm is not finite, before anything of it is saved."""
        losses = self.dist.mean(torch.stack([loss for loss, _, _ in pending]))
        z_losses = self.dist.mean(torch.stack([z for _, _, z in pending]))
        norms = torch.stack([n.full_tensor() if hasattr(n, "full_tensor") else n for _, n, _ in pending])
        losses, norms, z_losses = torch.stack([losses.float(), norms.float(), z_losses.float()]).tolist()  # one sync
        first = self.step - len(pending) + 1
        for step, loss, norm in zip(range(first, self.step + 1), losses, norms):
            if not math.isfinite(loss) or not math.isfinite(norm):
                what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {norm}"
                raise TrainingError(f"{what} at step {step}: training stopped, no checkpoint of it written "
                                    f"(try a lower optimizer.learning_rate or max_grad_norm)")
        norm = norms[-1]
        elapsed = max(time.monotonic() - since, 1e-9)
        tps = (self.tokens - tokens_before) / elapsed / self.dist.world  # per device
        t, _ = self._schedule_position()
        record = {"step": self.step, "tokens": self.tokens, "train/loss": sum(losses) / len(losses),
                  "train/step_losses": losses, "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": norm,
                  "grad_norm_limit": self.schedule.grad_norm_limit(t), "tokens_per_sec_per_device": tps,
                  "mfu": tps * flops_per_token / peak if peak else None, "memory_gib": memory_gib(self.device)}
        if self.cfg.z_loss_multiplier:  # the loss includes it; OLMo logs it apart as train/ZLoss
            record["train/z_loss"] = sum(z_losses) / len(z_losses)
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


class _StopVote:
    """Whether to stop after this step - a signal (SIGTERM first) or "time" (time_limit passed) on any rank, or
    None - the same answer on every rank. One process decides at once. Sharded, the ranks' reasons are summed
    by an all-reduce that is read a step later: on a GPU it is copied to pinned memory behind an event, so the
    host waits for that all-reduce only, never for the step queued after it."""

    def __init__(self, processes: dist.Dist) -> None:
        self.dist = processes
        self._pending: Callable[[], torch.Tensor] | None = None

    def __call__(self, received: signal.Signals | None, late: bool) -> signal.Signals | str | None:
        votes = torch.tensor([received == signal.SIGTERM, received == signal.SIGINT, late], dtype=torch.int32)
        if self.dist.sharded:
            previous, self._pending = self._pending, self._all_reduce(votes)
            if previous is None:
                return None
            votes = previous()
        sigterm, sigint, late = (votes > 0).tolist()
        return signal.SIGTERM if sigterm else signal.SIGINT if sigint else "time" if late else None

    def _all_reduce(self, votes: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Start summing `votes` over ranks; returns how to read the sum (on the host) later."""
        summed = self.dist.sum(votes.to(self.dist.device, non_blocking=True))
        if summed.device.type == "cpu":
            return lambda: summed
        host = torch.empty(summed.shape, dtype=summed.dtype, pin_memory=True)
        host.copy_(summed, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()

        def read() -> torch.Tensor:
            copied.synchronize()
            return host

        return read


class _StopSignals:
    """While training, the first SIGINT / SIGTERM is recorded in `received` (the loop finishes its step, saves and
    stops); a second one acts as if unhandled (stops at once). Signals ignored at start (a background job's
    SIGINT) stay ignored; outside the main thread (no handlers possible) nothing changes."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool) -> None:
        self.announce = announce
        self.received: signal.Signals | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # the second: what the signal did before
            previous = self._previous[signum]
            if callable(previous):
                previous(signum, frame)
                return
            signal.signal(signum, previous)
            os.kill(os.getpid(), signum)
            return
        self.received = signal.Signals(signum)
        if self.announce:  # os.write: no lock that the interrupted code might hold
            os.write(2, f"\n{self.received.name}: finishing the step, then saving a checkpoint "
                        f"(again: stop at once)\n".encode())


def _record_step(line: bytes) -> int | None:
    """The step of one metrics.jsonl line (None: not a record, e.g. torn by a kill mid-write)."""
    try:
        step = json.loads(line)["step"]
    except (ValueError, TypeError, KeyError):
        return None
    return step if isinstance(step, int) else None


@contextlib.contextmanager
def _writing(what: str, path: Path) -> Iterator[None]:
    """A failed write of `what` at `path` (a full disk, a lost mount, no permission...) becomes one TrainingError
    naming the path, the reason and the space left there, in place of a writer's traceback."""
    try:
        yield
    except Exception as err:
        if isinstance(err, TrainingError):
            raise
        raise TrainingError(f"cannot write the {what} {path}: {_reason(err)} ({_free_space(path)} free on its disk)"
                            ) from err


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror} (errno {err.errno})"
    if found := re.search(r"\(os error (\d+)\)", str(err)):  # safetensors' writer: the OSError in its text
        errno = int(found.group(1))
        return f"{os.strerror(errno)} (errno {errno})"
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _free_space(path: Path) -> str:
    folder = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:,.1f} MiB"
    except OSError:
        return "unknown space"


def _progress(enabled: bool, initial: int, total: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=None if enabled else True)


def _write(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(line)
