"""Training configuration: dataclasses with OLMo's key names, read from YAML, with dotted command-line overrides.

`olmo-fast train CONFIG.yaml --optimizer.learning_rate=3e-4 --data.paths=[a.npy,b.npy] --reset_trainer_state`
Values after `=` are parsed as YAML (so OLMo's list syntax `[a,b]`, numbers, `null`, `true` work); a bare
`--flag` means `true`. Keys OLMo has but olmo-fast does not implement are accepted with a warning, so an
OLMo training config (allenai/OLMo `configs/`) loads; any other unknown key is an error.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import torch
import yaml

from ..config import ConfigError, ModelConfig

# OLMo keys accepted but not acted on (scripts/train.py configs carry them).
_OLMO_IGNORED = {
    "": {"epoch", "dry_run", "restore_dataloader", "fast_forward_batches", "tokenizer", "remote_save_folder",
         "canceled_check_interval", "save_interval_unsharded", "save_interval_ephemeral",
         "save_num_unsharded_checkpoints_to_keep", "force_save_unsharded", "no_pre_train_checkpoint",
         "load_path_sharded_checkpointer", "sharded_checkpointer", "new_style_checkpoints",
         "device_train_batch_size", "device_eval_batch_size", "eval_subset_num_batches", "eval_on_load",
         "device_train_grad_accum", "max_grad_norm_ratio", "wandb", "speed_monitor", "gen1_gc_interval",
         "distributed_strategy", "ddp",
         "extra_steps_after_cancel", "early_stopping_factor", "save_data_indices", "python_profiling",
         "torch_profiling", "stop_after", "hf_datasets_cache_dir", "module_outputs_save_steps"},
    "data": {"pad_direction", "generate_attention_mask", "generate_doc_lengths", "num_workers",
             "drop_last", "pin_memory", "prefetch_factor", "persistent_workers", "timeout", "instance_filter"},
    "optimizer": {"no_decay_norm_and_bias", "selective_updates", "metrics_log_interval", "record_update_metrics"},
    "scheduler": set(),
    "fsdp": {"use_orig_params", "sharding_strategy", "wrapping_strategy", "hybrid_sharding_num_model_replicas"},
    "evaluators": {"device_eval_batch_size"},
}


# activation_checkpointing value -> recompute every n-th block (OLMo's names)
CHECKPOINT_EVERY = {"whole_layer": 1, "one_in_two": 2, "one_in_three": 3, "one_in_four": 4}


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)  # empty: the built-in corpus (see corpus.py)
    datasets: dict[str, list[str]] | None = None  # OLMo's named groups of paths: added to `paths`
    label_mask_paths: list[str] | None = None
    memmap_dtype: str = "uint16"  # uint16 | uint32 | uint64
    seed: int | None = None  # data order seed (None: the run's `seed`)
    validate: bool = True  # scan token files for out-of-vocabulary ids before training

    def all_paths(self) -> list[str]:
        groups = self.datasets or {}
        if not isinstance(groups, dict) or not all(isinstance(g, list) for g in groups.values()):
            raise ConfigError(f"data.datasets must map names to lists of paths, got {groups!r}")
        return list(self.paths) + [str(p) for group in groups.values() for p in group]


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    learning_rate: float = 4e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-5
    decay_norm_and_bias: bool = False
    decay_embeddings: bool = False


@dataclass
class SchedulerConfig:
    name: str = "cosine_with_warmup"  # cosine_with_warmup | linear_with_warmup | constant_with_warmup | constant
    units: str = "steps"  # steps | tokens
    t_warmup: float = 100
    t_max: float | None = None  # None: the run's length
    alpha_f: float = 0.1  # final LR = alpha_f * learning_rate
    warmup_min_lr: float | None = None  # None: 0.1 * learning_rate
    grad_clip_warmup_steps: float | None = None
    grad_clip_warmup_factor: float | None = None


@dataclass
class EvaluatorConfig:
    label: str = "eval"
    type: str = "lm"  # lm: loss on token files; downstream: `label` names an `olmo-fast eval` task
    data: DataConfig = field(default_factory=DataConfig)
    subset_num_batches: int | None = None  # None: the whole eval set (downstream: the first N documents)


@dataclass
class FSDPConfig:
    precision: str = "mixed"  # mixed: bf16 params, fp32 reduce | pure: bf16 both | full: fp32 both


@dataclass
class TrainConfig:
    run_name: str | None = None
    seed: int = 6198
    model: Any = None  # a preset name, a dict of ModelConfig / OLMo model keys (+ optional "preset"); None: tiny
    backend: str | None = None  # ops backend: None (best available), torch, triton, cpp
    device: str | None = None  # None: cuda if available else cpu
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    evaluators: list[EvaluatorConfig] = field(default_factory=list)
    eval_interval: int | None = None
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    save_folder: str | None = None  # None: runs/<timestamp>
    save_overwrite: bool = False
    save_interval: int | None = 1000
    save_num_checkpoints_to_keep: int = 3  # -1: keep all
    export_hf: bool = True  # write the final weights in HF layout to <save_folder>/hf
    load_path: str | None = None  # a training checkpoint (stepN) or an HF / OLMo model directory
    reset_trainer_state: bool = False  # with load_path: restart step, tokens and data order (keep optimizer)
    reset_optimizer_state: bool = False
    try_load_latest_save: bool = False  # `--resume`: continue from the newest complete checkpoint
    trust_pickle_checkpoint: bool = False  # read pickles (an old checkpoint, load_path's pytorch_model.bin / model.pt)
    max_duration: Any = 1000  # steps (int), "NT" tokens, or "Nep" epochs
    stop_at: int | None = None  # stop after this step, whatever the schedule says
    time_limit: float | None = None  # seconds
    global_train_batch_size: int = 512
    device_train_microbatch_size: int = 8
    max_grad_norm: float | None = 1.0
    precision: str | None = None  # amp_bf16 | fp32; None: amp_bf16 on GPU, fp32 on CPU
    compile: Any = False  # torch.compile each block; a mapping (OLMo's: mode, fullgraph, dynamic) is passed on
    activation_checkpointing: Any = False  # true / whole_layer: every block; one_in_two / three / four
    fused_loss: bool | None = None  # ops.linear_cross_entropy (no logits); None: where a fused kernel exists
    z_loss_multiplier: float | None = None  # OLMo-core's z-loss: + this x logsumexp(logits)^2 per token (None: off)
    console_log_interval: int = 1
    flops_peak: float | None = None  # accelerator bf16 peak FLOP/s for MFU (None: known cards)

    # ------------------------------------------------------------------ derived values
    def model_config(self) -> ModelConfig:
        return model_config_from(self.model if self.model is not None else "tiny")

    def max_duration_parsed(self) -> tuple[str, float]:
        """("steps" | "tokens" | "epochs", amount)."""
        value = self.max_duration
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return "steps", int(value)
        text = str(value).strip()
        try:
            if text.endswith("T"):
                return "tokens", int(float(text[:-1]))
            if text.endswith("ep"):
                return "epochs", float(text[:-2])
            return "steps", int(float(text))
        except ValueError:
            raise ConfigError(f"max_duration {value!r} must be steps (1000), tokens (2e9T) or epochs (1ep)") from None

    def validate(self) -> None:
        """Reject settings that cannot describe a run, each with one line, before any work."""
        for ok, message in self._checks():
            if not ok:
                raise ConfigError(message)
        _, amount = self.max_duration_parsed()
        if not amount > 0:
            raise ConfigError(f"max_duration {self.max_duration!r} must be positive")
        self.model_config()

    def _checks(self) -> list[tuple[bool, str]]:
        g, m = self.global_train_batch_size, self.device_train_microbatch_size
        opt, sched = self.optimizer, self.scheduler
        return [
            (g > 0 and m > 0, "global_train_batch_size and device_train_microbatch_size must be positive"),
            (opt.name == "adamw", f"optimizer.name {opt.name!r}: only adamw is implemented"),
            (_positive(opt.learning_rate), f"optimizer.learning_rate {opt.learning_rate} must be positive"),
            (self.z_loss_multiplier is None or 0 <= self.z_loss_multiplier < math.inf,
             f"z_loss_multiplier must be a number >= 0 (or null: off), got {self.z_loss_multiplier!r}"),
            (_at_least_zero(opt.weight_decay), f"optimizer.weight_decay {opt.weight_decay} must be >= 0"),
            (len(opt.betas) == 2 and all(0 <= b < 1 for b in opt.betas),
             f"optimizer.betas {list(opt.betas)} must be two numbers in [0, 1)"),
            (_positive(opt.eps), f"optimizer.eps {opt.eps} must be positive"),
            (self.max_grad_norm is None or _positive(self.max_grad_norm),
             f"max_grad_norm {self.max_grad_norm} must be positive (null: no clipping)"),
            (sched.name in ("cosine_with_warmup", "linear_with_warmup", "constant_with_warmup", "constant"),
             f"scheduler.name {sched.name!r} is not one of cosine_with_warmup, linear_with_warmup, "
             f"constant_with_warmup, constant"),
            (sched.units in ("steps", "tokens"), "scheduler.units must be steps or tokens"),
            (_at_least_zero(sched.t_warmup), f"scheduler.t_warmup {sched.t_warmup} must be >= 0"),
            (sched.t_max is None or _positive(sched.t_max), f"scheduler.t_max {sched.t_max} must be positive"),
            (_at_least_zero(sched.alpha_f) and sched.alpha_f <= 1,
             f"scheduler.alpha_f {sched.alpha_f} must lie in [0, 1]"),
            (sched.warmup_min_lr is None or _at_least_zero(sched.warmup_min_lr),
             f"scheduler.warmup_min_lr {sched.warmup_min_lr} must be >= 0"),
            (sched.grad_clip_warmup_steps is None or _at_least_zero(sched.grad_clip_warmup_steps),
             f"scheduler.grad_clip_warmup_steps {sched.grad_clip_warmup_steps} must be >= 0"),
            (sched.grad_clip_warmup_factor is None or _positive(sched.grad_clip_warmup_factor),
             f"scheduler.grad_clip_warmup_factor {sched.grad_clip_warmup_factor} must be positive"),
            (self.precision in (None, "amp_bf16", "fp32"), f"precision {self.precision!r} must be amp_bf16 or fp32"),
            (self.fsdp.precision in ("mixed", "pure", "full"), "fsdp.precision must be mixed, pure or full"),
            (self.data.memmap_dtype in ("uint8", "uint16", "uint32", "uint64"),
             f"data.memmap_dtype {self.data.memmap_dtype!r} must be uint8, uint16, uint32 or uint64"),
            (self.data.label_mask_paths is None or len(self.data.label_mask_paths) == len(self.data.all_paths()),
             f"data.label_mask_paths has {len(self.data.label_mask_paths or [])} files for "
             f"{len(self.data.all_paths())} data.paths"),
            ((self.data.seed if self.data.seed is not None else self.seed) >= 0, "seed and data.seed must be >= 0"),
            (self.console_log_interval > 0, "console_log_interval must be positive"),
            *((value is None or value > 0, f"{name} {value} must be positive (null: never)")
              for name, value in (("save_interval", self.save_interval), ("eval_interval", self.eval_interval))),
            *((value is None or _positive(value), f"{name} {value} must be positive")
              for name, value in (("stop_at", self.stop_at), ("time_limit", self.time_limit),
                                  ("flops_peak", self.flops_peak))),
            (self.save_num_checkpoints_to_keep == -1 or self.save_num_checkpoints_to_keep > 0,
             f"save_num_checkpoints_to_keep {self.save_num_checkpoints_to_keep} must be positive (-1: keep all)"),
            *((ev.subset_num_batches is None or ev.subset_num_batches > 0,
               f"evaluator {ev.label!r}: subset_num_batches {ev.subset_num_batches} must be positive")
              for ev in self.evaluators),
            (self.activation_checkpointing in (False, True, None) or self.activation_checkpointing in CHECKPOINT_EVERY,
             f"activation_checkpointing {self.activation_checkpointing!r} must be true, false or one of "
             f"{sorted(CHECKPOINT_EVERY)}"),
            (isinstance(self.compile, (bool, dict)) or self.compile is None,
             f"compile must be true/false or a mapping of torch.compile options, got {self.compile!r}"),
            (self.backend in (None, "torch", "triton", "cpp"),
             f"backend {self.backend!r} must be torch, triton or cpp"),
            _device_check(self.device),
            (self.load_path is None or Path(self.load_path).exists(), f"load_path {self.load_path} does not exist"),
        ]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["optimizer"]["betas"] = list(self.optimizer.betas)
        return out


def _positive(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _at_least_zero(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value >= 0


def _device_check(device: str | None) -> tuple[bool, str]:
    """(usable, why not) for the `device` setting: a torch device name, CUDA only where torch sees a GPU."""
    if device is None:
        return True, ""
    try:
        dev = torch.device(device)
    except RuntimeError:
        return False, f"device {device!r} is not a torch device name (cpu, cuda, cuda:1)"
    if dev.type not in ("cpu", "cuda"):
        return False, f"device {device!r}: training runs on cpu or cuda"
    count = torch.cuda.device_count() if dev.type == "cuda" else 1
    if dev.type == "cuda" and (count == 0 or (dev.index or 0) >= count):
        return False, f"device {device!r} was asked for, but torch sees {count} GPU(s)"
    return True, ""


def model_config_from(value: Any) -> ModelConfig:
    """A ModelConfig from a preset name, our own keys (optionally with `preset`), or an OLMo `model:` block."""
    if isinstance(value, ModelConfig):
        return value
    if isinstance(value, str):
        return ModelConfig.preset(value)
    if not isinstance(value, dict):
        raise ConfigError(f"model must be a preset name or a mapping, got {value!r}")
    value = dict(value)
    ours = {f.name for f in dataclasses.fields(ModelConfig)}
    if "preset" in value:
        name = value.pop("preset")
        unknown = sorted(set(value) - ours)
        if unknown:
            raise ConfigError(f"unknown model keys {unknown}")
        return ModelConfig.preset(name, **value)
    if set(value) <= ours:
        return ModelConfig.from_dict(value)
    return ModelConfig.from_olmo(value)


# ---------------------------------------------------------------------------------------------- building
def _build(cls: type, values: Any, where: str, ignored: list[str]) -> Any:
    """Instantiate dataclass `cls` from a mapping, recursing into nested dataclasses; unknown keys are errors
    unless OLMo has them (then they are listed in `ignored`, when set to something)."""
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {values!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    section = where.split(".")[-1] if where else ""
    section = "evaluators" if section.startswith("evaluators[") else section
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            if key in _OLMO_IGNORED.get(section, ()):
                if value not in (None, False, {}, []):
                    ignored.append(f"{where + '.' if where else ''}{key}")
                continue
            raise ConfigError(f"unknown config key {where + '.' if where else ''}{key}; known: {sorted(names)}")
        kwargs[key] = _convert(hints[key], value, f"{where}.{key}" if where else key, ignored)
    return cls(**kwargs)


def _convert(hint: Any, value: Any, where: str, ignored: list[str]) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where, ignored)
    origin = get_origin(hint)
    args = [a for a in get_args(hint) if a is not type(None)]
    if value is None and hint is not Any and type(None) not in get_args(hint):
        if origin is list:  # OLMo writes unset lists as null
            return []
        raise ConfigError(f"{where} must not be null")
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list")
        return [_build(args[0], v, f"{where}[{i}]", ignored) for i, v in enumerate(value)]
    if value is None:
        return None
    if origin is list or (args and get_origin(args[0]) is list):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [str(v) for v in value]
    if origin is tuple:
        try:
            return tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a list of numbers, got {value!r}") from None
    base = args[0] if args else hint
    if base in (int, float) and not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
        if base is int:
            if not number.is_integer():
                raise ConfigError(f"{where} must be an integer, got {value!r}")
            return int(number)
        return number
    if base is bool and not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if base is str and not isinstance(value, str):
        return str(value)
    return value


def parse_overrides(args: list[str]) -> tuple[str | None, dict[str, Any]]:
    """`[CONFIG.yaml] --a.b=value --flag ...` -> (config path, nested dict of overrides)."""
    config_path, nested = None, {}
    for arg in args:
        if not arg.startswith("--"):
            if config_path is not None:
                raise ConfigError(f"unexpected argument {arg!r}: give one config file, then --key=value overrides")
            config_path = arg
            continue
        key, sep, text = arg[2:].partition("=")
        key = {"resume": "try_load_latest_save"}.get(key, key)
        try:
            value = yaml.safe_load(text) if sep else True
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or err
            raise ConfigError(f"cannot parse the value of {arg!r} (YAML): {problem}") from None
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"malformed override {arg!r}; expected --key.path=value")
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {arg!r} conflicts with another override of {part}")
        node[leaf] = value
    return config_path, nested


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        elif key == "model" and isinstance(value, dict) and isinstance(out.get(key), str):  # preset + changes
            out[key] = {"preset": out[key], **value}
        else:
            out[key] = value
    return out


def _olmo_z_loss(values: dict[str, Any]) -> dict[str, Any]:
    """allenai/OLMo's z-loss settings (`softmax_auxiliary_loss: true`, `auxiliary_loss_multiplier`, default 1e-4)
    as OLMo-core's `z_loss_multiplier`, which wins where both are set."""
    values = dict(values)
    enabled = values.pop("softmax_auxiliary_loss", False)
    multiplier = values.pop("auxiliary_loss_multiplier", None)
    if enabled and values.get("z_loss_multiplier") is None:
        values["z_loss_multiplier"] = 1e-4 if multiplier is None else multiplier
    return values


def load_config(args: list[str] | None = None, base: dict[str, Any] | None = None) -> TrainConfig:
    """The TrainConfig of `olmo-fast train ARGS`: defaults <- `base` <- the YAML file <- the overrides."""
    config_path, overrides = parse_overrides(list(args or []))
    values = dict(base or {})
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"cannot parse {path}: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of config keys")
        values = _merge(values, loaded)
    values = _olmo_z_loss(_merge(values, overrides))
    ignored: list[str] = []
    config = _build(TrainConfig, values, "", ignored)
    if ignored:
        warnings.warn(f"olmo-fast ignores these OLMo settings: {', '.join(ignored)}", stacklevel=2)
    config.validate()
    return config


def save_config(config: TrainConfig, path: Path) -> None:
    resolved = config.to_dict()
    resolved["model"] = config.model_config().to_dict()
    path.write_text(yaml.safe_dump(resolved, sort_keys=False))


def warn_to_stderr() -> None:
    """Show config warnings as one plain line each."""
    warnings.showwarning = lambda message, *_args, **_kw: print(f"warning: {message}", file=sys.stderr)


__all__ = ["TrainConfig", "DataConfig", "OptimizerConfig", "SchedulerConfig", "EvaluatorConfig", "FSDPConfig",
           "load_config", "parse_overrides", "save_config", "model_config_from", "ConfigError"]
