"""Model configuration: the official OLMo presets, small test presets, and readers for HF/OLMo configs."""
from __future__ import annotations

import dataclasses
import difflib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import hf_names
from .errors import ConfigError

# The fields of allenai/OLMo's `olmo.config.ModelConfig` (ai2-olmo), the keys a `model:` block may hold; embedded
# so that olmo-fast does not import ai2-olmo at runtime (tests/test_model_config.py checks it against the package).
OLMO_MODEL_KEYS = frozenset({
    "activation_type", "alibi", "alibi_bias_max", "attention_dropout", "attention_layer_norm",
    "attention_layer_norm_with_affine", "bias_for_layer_norm", "block_group_size", "block_type", "clip_qkv",
    "d_model", "emb_init_std", "embedding_dropout", "embedding_layer_norm", "embedding_size", "eos_token_id",
    "flash_attention", "include_bias", "init_cutoff_factor", "init_device", "init_fn", "init_std",
    "layer_norm_eps", "layer_norm_type", "layer_norm_with_affine", "max_sequence_length", "mlp_hidden_size",
    "mlp_ratio", "multi_query_attention", "n_heads", "n_kv_heads", "n_layers", "norm_after", "pad_token_id",
    "precision", "residual_dropout", "rope", "rope_full_precision", "rope_theta", "scale_emb_init", "scale_logits",
    "vocab_size", "weight_tying",
})
# OLMo model keys that change the architecture -> the values olmo-fast implements (a missing key is fine).
_OLMO_SUPPORTED = {
    "activation_type": ("swiglu",), "block_type": ("sequential",), "layer_norm_type": ("default", None),
    "rope": (True,), "attention_layer_norm": (False, None), "bias_for_layer_norm": (False, None),
    "include_bias": (False, None), "layer_norm_with_affine": (False, None), "alibi": (False, None),
    "multi_query_attention": (False, None), "embedding_layer_norm": (False, None), "scale_logits": (False, None),
    "norm_after": (False, None),
}


@dataclass
class ModelConfig:
    """Everything that fixes the shape and numerics of an OLMo model.

    `mlp_hidden_size` is the width of the fused `ff_proj` output (`[up | gate]`), as in OLMo's own config;
    the SwiGLU output (and HF's `intermediate_size`) is half of it.
    """

    d_model: int = 4096
    n_heads: int = 32
    n_kv_heads: int | None = None
    n_layers: int = 32
    mlp_hidden_size: int = 22016
    max_sequence_length: int = 2048
    rope_theta: float = 10000.0
    clip_qkv: float | None = None
    vocab_size: int = 50280
    embedding_size: int = 50304
    weight_tying: bool = False
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 50279
    pad_token_id: int = 1
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def intermediate_size(self) -> int:
        """Width of the SwiGLU output (HF's `intermediate_size`)."""
        return self.mlp_hidden_size // 2

    @property
    def qkv_size(self) -> int:
        return self.d_model + 2 * self.n_kv_heads * self.head_dim

    def num_params(self, include_embedding: bool = True) -> int:
        d, L = self.d_model, self.n_layers
        block = d * self.qkv_size + d * d + d * self.mlp_hidden_size + self.intermediate_size * d
        emb = self.embedding_size * d
        head = 0 if self.weight_tying else self.embedding_size * d
        return L * block + (emb + head if include_embedding else head)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6 x (every matmul weight: blocks and head) + 12·L·d·T for attention."""
        T = seq_len or self.max_sequence_length
        matmul_params = (self.num_params(include_embedding=False)
                         + self.weight_tying * self.embedding_size * self.d_model)
        return 6 * matmul_params + 12 * self.n_layers * self.d_model * T

    def validate(self) -> None:
        checks = [
            (self.d_model > 0 and self.n_heads > 0 and self.n_layers > 0,
             "d_model, n_heads and n_layers must be positive"),
            (self.d_model % self.n_heads == 0, f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}"),
            (self.head_dim % 2 == 0, f"head_dim {self.head_dim} must be even for RoPE"),
            (self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads == 0,
             f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}"),
            (self.mlp_hidden_size > 0 and self.mlp_hidden_size % 2 == 0,
             f"mlp_hidden_size {self.mlp_hidden_size} must be even (it holds [up | gate])"),
            (self.embedding_size >= self.vocab_size,
             f"embedding_size {self.embedding_size} is smaller than vocab_size {self.vocab_size}"),
            (self.clip_qkv is None or self.clip_qkv > 0, f"clip_qkv must be positive, got {self.clip_qkv}"),
            (self.max_sequence_length > 0, "max_sequence_length must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    # ------------------------------------------------------------------ presets and conversion
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        _reject_unknown(values, {f.name for f in dataclasses.fields(cls)}, "model config key")
        return cls(**values)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """From the dict of an HF `OlmoConfig` (`config.json`); a setting olmo-fast would ignore is an error."""
        _require_supported(hf, hf_names.SUPPORTED_CONFIG, "HF config")
        _warn_dropout(hf, ("attention_dropout",))
        return cls(**hf_names.config_fields(hf))

    def to_hf(self) -> dict[str, Any]:
        """The `config.json` of an HF `OlmoForCausalLM` with the same weights (vocab = padded embedding)."""
        return hf_names.config_json(self)

    @classmethod
    def from_olmo(cls, cfg: dict[str, Any]) -> ModelConfig:
        """From the `model:` section of an original OLMo `config.yaml`."""
        model = cfg.get("model", cfg)
        if not isinstance(model, dict):
            raise ConfigError(f"the OLMo model config must be a mapping, got {model!r}")
        _reject_unknown(model, OLMO_MODEL_KEYS, "OLMo model key")
        _require_supported(model, _OLMO_SUPPORTED, "OLMo config")
        _warn_dropout(model, ("attention_dropout", "residual_dropout", "embedding_dropout"))
        try:
            d_model = int(model["d_model"])
            mlp = model.get("mlp_hidden_size") or int(model.get("mlp_ratio", 4)) * d_model
            vocab = int(model.get("vocab_size", 50280))
            return cls(
                d_model=d_model,
                n_heads=int(model["n_heads"]),
                n_kv_heads=model.get("n_kv_heads") or int(model["n_heads"]),
                n_layers=int(model["n_layers"]),
                mlp_hidden_size=int(mlp),
                max_sequence_length=int(model.get("max_sequence_length", 2048)),
                rope_theta=float(model.get("rope_theta", 10000.0)),
                clip_qkv=None if model.get("clip_qkv") is None else float(model["clip_qkv"]),
                vocab_size=vocab,
                embedding_size=int(model.get("embedding_size") or vocab),
                weight_tying=bool(model.get("weight_tying", True)),
                layer_norm_eps=float(model.get("layer_norm_eps", 1e-5)),
                eos_token_id=int(model.get("eos_token_id", 50279)),
                pad_token_id=int(model.get("pad_token_id", 1)),
                init_std=float(model.get("init_std", 0.02)),
            )
        except KeyError as missing:
            raise ConfigError(f"OLMo config lacks the key {missing}") from None

    def to_olmo(self) -> dict[str, Any]:
        """The `model:` section of an original OLMo config for these weights."""
        return {
            "d_model": self.d_model, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
            "n_layers": self.n_layers, "mlp_hidden_size": self.mlp_hidden_size,
            "max_sequence_length": self.max_sequence_length, "rope": True, "rope_theta": self.rope_theta,
            "rope_full_precision": True, "clip_qkv": self.clip_qkv, "vocab_size": self.vocab_size,
            "embedding_size": self.embedding_size, "weight_tying": self.weight_tying,
            "layer_norm_eps": self.layer_norm_eps, "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
            "activation_type": "swiglu", "block_type": "sequential", "layer_norm_type": "default",
            "layer_norm_with_affine": False, "attention_layer_norm": False, "include_bias": False,
            "bias_for_layer_norm": False, "alibi": False, "attention_dropout": 0.0, "residual_dropout": 0.0,
            "embedding_dropout": 0.0, "init_fn": "mitchell", "init_std": self.init_std,
        }

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """From an HF `config.json`, an OLMo `config.yaml`, or a directory holding either."""
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path} does not exist")
        if path.is_dir():
            for name in ("config.json", "config.yaml"):
                if (path / name).is_file():
                    return cls.from_file(path / name)
            raise ConfigError(f"{path} holds neither config.json nor config.yaml")
        text = path.read_text()
        try:
            if path.suffix == ".json":
                return cls.from_hf(json.loads(text))
            import yaml

            return cls.from_olmo(yaml.safe_load(text))
        except (json.JSONDecodeError, ValueError, TypeError) as err:
            if isinstance(err, ConfigError):
                raise ConfigError(f"{path}: {err}") from None
            raise ConfigError(f"cannot parse {path}: {err}") from None
        except Exception as err:  # yaml.YAMLError and friends
            raise ConfigError(f"cannot parse {path}: {err}") from None


def _reject_unknown(values: dict[str, Any], known: set[str] | frozenset[str], what: str) -> None:
    """ConfigError naming the first key of `values` not in `known`, and the known key closest to it."""
    unknown = sorted(set(values) - set(known))
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {sorted(known)}"
        raise ConfigError(f"unknown {what} {unknown[0]!r}{hint}")


def _require_supported(values: dict[str, Any], supported: dict[str, tuple], source: str) -> None:
    for key, allowed in supported.items():
        if key in values and values[key] not in allowed:
            raise ConfigError(f"{source} sets {key}={values[key]!r}; olmo-fast supports only "
                              f"{' or '.join(repr(a) for a in allowed if a is not None)}")


def _warn_dropout(values: dict[str, Any], keys: tuple[str, ...]) -> None:
    """Dropout only changes training, which olmo-fast runs without it: say so rather than drop it silently."""
    nonzero = [f"{key}={values[key]}" for key in keys if values.get(key)]
    if nonzero:
        warnings.warn(f"olmo-fast trains without dropout; ignoring {', '.join(nonzero)}", stacklevel=3)


PRESETS: dict[str, ModelConfig] = {
    "olmo-1b": ModelConfig(d_model=2048, n_heads=16, n_layers=16, mlp_hidden_size=16384,
                           max_sequence_length=2048, weight_tying=True),
    "olmo-7b": ModelConfig(d_model=4096, n_heads=32, n_layers=32, mlp_hidden_size=22016,
                           max_sequence_length=2048, weight_tying=False),
    "olmo-1.7-7b": ModelConfig(d_model=4096, n_heads=32, n_layers=32, mlp_hidden_size=22016,
                               max_sequence_length=4096, weight_tying=False, clip_qkv=8.0),
    # ~20M parameters (13M of them the embedding): trains on a CPU in minutes.
    "tiny": ModelConfig(d_model=256, n_heads=4, n_layers=4, mlp_hidden_size=2048,
                        max_sequence_length=256, weight_tying=True, clip_qkv=8.0),
    # A few hundred thousand parameters with a small vocabulary: for unit tests.
    "test": ModelConfig(d_model=64, n_heads=4, n_layers=2, mlp_hidden_size=256, max_sequence_length=64,
                        vocab_size=250, embedding_size=256, weight_tying=False, clip_qkv=None,
                        eos_token_id=0, pad_token_id=1),
}
