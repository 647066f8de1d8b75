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
from .rope_scaling import RopeScaling

# The model families olmo-fast runs (HF's model_type): OLMo 1 / 1.7 (pre-norm, LayerNorm without weights), OLMo 2
# (norms after the sublayers, QK-norm, RMSNorm with weights), OLMo 3 (OLMo 2's block, sliding windows per layer).
ARCHITECTURES = ("olmo", "olmo2", "olmo3")
LAYER_TYPES = ("full_attention", "sliding_attention")  # HF's names, one per layer in `layer_types`

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
# OLMo model keys that change the architecture -> the values olmo-fast implements (a missing key is fine), for
# OLMo 1 (pre-norm, non-parametric LayerNorm) and OLMo 2 (`norm_after: true`: QK-norm, RMSNorm with weights).
_OLMO_SUPPORTED = {
    "activation_type": ("swiglu",), "block_type": ("sequential",), "layer_norm_type": ("default", None),
    "rope": (True,), "attention_layer_norm": (False, None), "bias_for_layer_norm": (False, None),
    "include_bias": (False, None), "layer_norm_with_affine": (False, None), "alibi": (False, None),
    "multi_query_attention": (False, None), "embedding_layer_norm": (False, None), "scale_logits": (False, None),
    "norm_after": (False, None),
}
_OLMO2_SUPPORTED = {
    **_OLMO_SUPPORTED, "norm_after": (True,), "attention_layer_norm": (True,), "layer_norm_type": ("rms",),
    "layer_norm_with_affine": (True,), "attention_layer_norm_with_affine": (True, None), "clip_qkv": (None,),
}


@dataclass
class ModelConfig:
    """Everything that fixes the shape and numerics of an OLMo model.

    `mlp_hidden_size` is the width of the fused `ff_proj` output (`[up | gate]`), as in OLMo's own config;
    the SwiGLU output (and HF's `intermediate_size`) is half of it. `architecture` picks the block: "olmo" (OLMo 1,
    the defaults), "olmo2" (post-norms, QK-norm; `norm_after` / `qk_norm` say so) or "olmo3" (OLMo 2's block with
    per-layer sliding windows: `attention_types`, `layer_window`, `layer_rope_scaling`).
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
    architecture: str = "olmo"  # one of ARCHITECTURES (HF's model_type)
    # OLMo 3: the window of the "sliding_attention" layers, and each layer's type (None: HF's default pattern,
    # full attention on every fourth layer, sliding on the others).
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    # RoPE scaling of the full-attention layers (OLMo 3's yarn; OLMo 2: every layer); sliding layers never scale.
    rope_scaling: RopeScaling | None = None

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if isinstance(self.rope_scaling, dict):  # from to_dict() / a YAML model block
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.layer_types is not None:  # one canonical spelling: None for HF's default pattern
            self.layer_types = list(self.layer_types)
            if self.architecture == "olmo3" and self.layer_types == default_layer_types(self.n_layers):
                self.layer_types = None
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

    @property
    def norm_after(self) -> bool:
        """OLMo 2/3's block (allenai/OLMo's `norm_after`): RMSNorm with a weight after each sublayer, QK-norm."""
        return self.architecture != "olmo"

    @property
    def qk_norm(self) -> bool:
        """RMSNorm over the whole q and k projections before RoPE (OLMo 2/3; allenai/OLMo's
        `attention_layer_norm`)."""
        return self.architecture != "olmo"

    @property
    def attention_types(self) -> list[str]:
        """Every layer's attention type ("full_attention" | "sliding_attention")."""
        if self.architecture != "olmo3":
            return ["full_attention"] * self.n_layers
        return list(self.layer_types) if self.layer_types is not None else default_layer_types(self.n_layers)

    def layer_window(self, layer: int) -> int | None:
        """The attention window of `layer` (None: the whole causal context)."""
        return self.sliding_window if self.attention_types[layer] == "sliding_attention" else None

    def layer_rope_scaling(self, layer: int) -> RopeScaling | None:
        """The RoPE scaling of `layer`: the config's on full-attention layers, none on sliding ones (as HF's
        Olmo3)."""
        return self.rope_scaling if self.attention_types[layer] == "full_attention" else None

    def num_params(self, include_embedding: bool = True) -> int:
        d, L = self.d_model, self.n_layers
        block = d * self.qkv_size + d * d + d * self.mlp_hidden_size + self.intermediate_size * d
        if self.norm_after:  # the weights of q_norm, k_norm, attn_norm, ff_norm; and of ln_f
            block += self.qkv_size - self.n_kv_heads * self.head_dim + 2 * d
        emb = self.embedding_size * d + self.norm_after * d
        head = 0 if self.weight_tying else self.embedding_size * d
        return L * block + (emb + head if include_embedding else head)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6 x (every matmul weight: blocks and head) + 12·d·T per layer for attention
        (T capped at the window on sliding-window layers)."""
        T = seq_len or self.max_sequence_length
        matmul_params = (self.num_params(include_embedding=False) - self.norm_after * self.d_model
                         + self.weight_tying * self.embedding_size * self.d_model)
        spans = sum(min(T, self.layer_window(i) or T) for i in range(self.n_layers))
        return 6 * matmul_params + 12 * self.d_model * spans

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
            (self.architecture in ARCHITECTURES,
             f"architecture {self.architecture!r} is not one of {', '.join(ARCHITECTURES)}"),
        ]
        checks += self._family_checks()
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def _family_checks(self) -> list[tuple[bool, str]]:
        """What each architecture allows: clipping is OLMo 1's, RoPE scaling OLMo 2/3's, windows OLMo 3's."""
        arch, types = self.architecture, self.layer_types
        checks = [
            (arch == "olmo" or self.clip_qkv is None, f"{arch} has no clip_qkv (QK-norm instead), got {self.clip_qkv}"),
            (arch != "olmo" or self.rope_scaling is None, "RoPE scaling needs architecture olmo2 or olmo3"),
            (arch == "olmo3" or (self.sliding_window is None and types is None),
             f"sliding_window and layer_types need architecture olmo3, not {arch}"),
            (self.rope_scaling is None or isinstance(self.rope_scaling, RopeScaling),
             f"rope_scaling must be a RopeScaling or its dict, got {self.rope_scaling!r}"),
        ]
        if arch == "olmo3":
            bad = [t for t in types or () if t not in LAYER_TYPES]
            checks += [
                (types is None or len(types) == self.n_layers,
                 f"layer_types lists {len(types or ())} layers, the model has {self.n_layers}"),
                (not bad, f"layer type {bad[0] if bad else ''!r} is not one of {', '.join(LAYER_TYPES)}"),
                (self.sliding_window is not None or "sliding_attention" not in self.attention_types,
                 "sliding_attention layers need a sliding_window"),
                (self.sliding_window is None or self.sliding_window >= 1,
                 f"sliding_window must be at least 1, got {self.sliding_window}"),
            ]
        return checks

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
        olmo2 = bool(model.get("norm_after"))
        _require_supported(model, _OLMO2_SUPPORTED if olmo2 else _OLMO_SUPPORTED, "OLMo config")
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
                architecture="olmo2" if olmo2 else "olmo",
            )
        except KeyError as missing:
            raise ConfigError(f"OLMo config lacks the key {missing}") from None

    def to_olmo(self) -> dict[str, Any]:
        """The `model:` section of an original OLMo config for these weights (OLMo 1 or 2: allenai/OLMo has no
        sliding windows nor RoPE scaling)."""
        if self.architecture == "olmo3" or self.rope_scaling is not None:
            raise ConfigError(f"allenai/OLMo's config cannot describe {self.architecture} with "
                              f"{'RoPE scaling' if self.rope_scaling else 'sliding windows'}: save the HF layout")
        olmo2 = self.norm_after
        block = {"block_type": "sequential", "layer_norm_type": "rms" if olmo2 else "default", "norm_after": olmo2,
                 "layer_norm_with_affine": olmo2, "attention_layer_norm": olmo2,
                 "init_fn": "normal" if olmo2 else "mitchell", "init_cutoff_factor": 3.0}
        return {
            "d_model": self.d_model, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
            "n_layers": self.n_layers, "mlp_hidden_size": self.mlp_hidden_size,
            "max_sequence_length": self.max_sequence_length, "rope": True, "rope_theta": self.rope_theta,
            "rope_full_precision": True, "clip_qkv": self.clip_qkv, "vocab_size": self.vocab_size,
            "embedding_size": self.embedding_size, "weight_tying": self.weight_tying,
            "layer_norm_eps": self.layer_norm_eps, "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
            "activation_type": "swiglu", "include_bias": False, "bias_for_layer_norm": False, "alibi": False,
            "attention_dropout": 0.0, "residual_dropout": 0.0, "embedding_dropout": 0.0, "init_std": self.init_std,
            **block,
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


def default_layer_types(n_layers: int) -> list[str]:
    """HF Olmo3Config's default: full attention on every fourth layer (the last of each four), sliding on the rest."""
    return ["full_attention" if (i + 1) % 4 == 0 else "sliding_attention" for i in range(n_layers)]


# OLMo 2 / 3 share the dolma2 tokenizer (100,278 ids padded to 100,352), RMSNorm eps 1e-6 and RoPE theta 500,000.
_DOLMA2 = dict(vocab_size=100278, embedding_size=100352, eos_token_id=100257, pad_token_id=100277,
               layer_norm_eps=1e-6, rope_theta=500000.0)
_OLMO2 = dict(architecture="olmo2", weight_tying=False, max_sequence_length=4096, **_DOLMA2)
# OLMo 3: 8K pretraining context extended to 65K by yarn on the full-attention layers; windows of 4096.
_OLMO3 = dict(_OLMO2, architecture="olmo3", max_sequence_length=65536, sliding_window=4096,
              rope_scaling=RopeScaling(rope_type="yarn", factor=8.0, original_max_position_embeddings=8192,
                                       beta_fast=32.0, beta_slow=1.0))

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
    "olmo2-1b": ModelConfig(d_model=2048, n_heads=16, n_layers=16, mlp_hidden_size=16384, **_OLMO2),
    "olmo2-7b": ModelConfig(d_model=4096, n_heads=32, n_layers=32, mlp_hidden_size=22016, **_OLMO2),
    "olmo2-13b": ModelConfig(d_model=5120, n_heads=40, n_layers=40, mlp_hidden_size=27648, **_OLMO2),
    "olmo3-7b": ModelConfig(d_model=4096, n_heads=32, n_layers=32, mlp_hidden_size=22016, **_OLMO3),
    # The tiny presets with OLMo 2/3's block and the dolma2 vocabulary (~27M parameters, 26M of them the tied
    # embedding): train on a CPU in minutes. olmo3-tiny: windows of 64 on three of its four layers.
    "olmo2-tiny": ModelConfig(d_model=256, n_heads=4, n_layers=4, mlp_hidden_size=2048,
                              **dict(_OLMO2, max_sequence_length=256, weight_tying=True)),
    "olmo3-tiny": ModelConfig(d_model=256, n_heads=4, n_layers=4, mlp_hidden_size=2048, sliding_window=64,
                              **dict(_OLMO2, architecture="olmo3", max_sequence_length=256, weight_tying=True)),
    # Unit-test sizes with a small vocabulary; olmo3-test mixes a window of 8 with full attention.
    "olmo2-test": ModelConfig(d_model=64, n_heads=4, n_layers=2, mlp_hidden_size=256, max_sequence_length=64,
                              vocab_size=250, embedding_size=256, eos_token_id=0, pad_token_id=1, layer_norm_eps=1e-6,
                              rope_theta=500000.0, architecture="olmo2"),
    "olmo3-test": ModelConfig(d_model=64, n_heads=4, n_layers=2, mlp_hidden_size=256, max_sequence_length=64,
                              vocab_size=250, embedding_size=256, eos_token_id=0, pad_token_id=1, layer_norm_eps=1e-6,
                              rope_theta=500000.0, architecture="olmo3", sliding_window=8,
                              layer_types=["sliding_attention", "full_attention"]),
}
