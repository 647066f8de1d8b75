"""Hugging Face's names for OLMo 1/2/3, in one place: the keys of transformers' `OlmoConfig` / `Olmo2Config` /
`Olmo3Config` (`config.json`) and the tensor names of their causal LMs (`model.layers.{i}.self_attn.q_proj.weight`,
`...self_attn.q_norm.weight`, `...post_attention_layernorm.weight`, ...), each mapped to and from ours (= original
allenai/OLMo's: `ModelConfig` fields, `transformer.blocks.{i}.att_proj.weight`, `...q_norm.weight`, ...).

`config.py` builds a `ModelConfig` from `config_fields` and writes `config_json`; `checkpoint.py` renames
tensors with `hf_to_olmo` / `olmo_to_hf`. This module imports neither (a config is read through its attributes).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .errors import CheckpointError, ConfigError
from .rope_scaling import RopeScaling

if TYPE_CHECKING:  # annotations only: config.py imports this module
    from .config import ModelConfig

# The keys of HF's `OlmoConfig` / `Olmo2Config` / `Olmo3Config` that olmo-fast does not map onto ModelConfig ->
# the values it implements.
SUPPORTED_CONFIG = {"model_type": ("olmo", "olmo2", "olmo3"), "hidden_act": ("silu",), "attention_bias": (False, None)}
_CLASSES = {"olmo": "OlmoForCausalLM", "olmo2": "Olmo2ForCausalLM", "olmo3": "Olmo3ForCausalLM"}


# ---------------------------------------------------------------------------------------------- config.json
def config_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """The `ModelConfig` fields of an HF `config.json` dict (ConfigError if a key is missing or unsupported)."""
    arch = hf.get("model_type", "olmo")
    try:
        vocab, d, heads = int(hf["vocab_size"]), int(hf["hidden_size"]), int(hf["num_attention_heads"])
        if hf.get("head_dim") not in (None, d // heads):
            raise ConfigError(f"head_dim {hf['head_dim']} is not hidden_size / num_attention_heads = {d // heads}")
        fields = dict(
            d_model=d,
            n_heads=heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or heads),
            n_layers=int(hf["num_hidden_layers"]),
            mlp_hidden_size=2 * int(hf["intermediate_size"]),
            max_sequence_length=int(hf.get("max_position_embeddings", 2048)),
            clip_qkv=None if hf.get("clip_qkv") is None else float(hf["clip_qkv"]),
            vocab_size=vocab,
            embedding_size=vocab,
            weight_tying=bool(hf.get("tie_word_embeddings", False)),
            eos_token_id=_first_id(hf.get("eos_token_id"), 50279),
            pad_token_id=_first_id(hf.get("pad_token_id"), 1),
            init_std=float(hf.get("initializer_range", 0.02)),
            architecture=arch,
            **_rope_fields(hf, arch),
        )
        if arch != "olmo":  # OLMo 1's LayerNorm eps is fixed (1e-5); OLMo 2/3 name theirs
            fields["layer_norm_eps"] = float(hf.get("rms_norm_eps", 1e-5))
        if arch == "olmo3":
            fields["sliding_window"] = None if hf.get("sliding_window") is None else int(hf["sliding_window"])
            fields["layer_types"] = hf.get("layer_types")
        return fields
    except KeyError as missing:
        raise ConfigError(f"HF config lacks the key {missing}") from None


def _rope_fields(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    """`rope_theta` and `rope_scaling` from `rope_parameters` (OLMo 3: one dict per layer type, of which only
    the full-attention layers' may scale) or the legacy top-level `rope_theta` / `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    if arch == "olmo3" and "full_attention" in params:
        full, sliding = params.get("full_attention") or {}, params.get("sliding_attention") or {}
        if sliding.get("rope_type", "default") != "default":
            raise ConfigError("RoPE scaling on sliding_attention layers is not supported (only on full_attention)")
        theta = full.get("rope_theta", hf.get("rope_theta", 500000.0))
        if sliding.get("rope_theta", theta) != theta:
            raise ConfigError(f"sliding and full attention layers with different RoPE theta "
                              f"({sliding['rope_theta']} and {theta}) are not supported")
        params = full
    else:
        params = {**(hf.get("rope_scaling") or {}), **params}
    default_theta = 10000.0 if arch == "olmo" else 500000.0
    theta = float(params.get("rope_theta", hf.get("rope_theta", default_theta)))
    scaling = RopeScaling.from_hf(params, hf.get("max_position_embeddings"))
    if scaling is not None and arch == "olmo":
        raise ConfigError(f"RoPE type {scaling.rope_type!r} is not supported for OLMo 1 (only the default)")
    return {"rope_theta": theta, "rope_scaling": scaling}


def config_json(config: ModelConfig) -> dict[str, Any]:
    """The `config.json` of an HF `OlmoForCausalLM` / `Olmo2ForCausalLM` / `Olmo3ForCausalLM` with `config`'s
    weights (vocab = padded embedding)."""
    arch, theta = config.architecture, config.rope_theta
    scaled = config.rope_scaling.to_hf(theta) if config.rope_scaling else {"rope_type": "default", "rope_theta": theta}
    rope = scaled
    if arch == "olmo3":
        rope = {"full_attention": scaled, "sliding_attention": {"rope_type": "default", "rope_theta": theta}}
    out = {
        "architectures": [_CLASSES[arch]],
        "model_type": arch,
        "hidden_size": config.d_model,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "num_hidden_layers": config.n_layers,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_sequence_length,
        "rope_parameters": rope,
        "vocab_size": config.embedding_size,
        "tie_word_embeddings": config.weight_tying,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "bos_token_id": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": config.init_std,
        "use_cache": True,
    }
    if arch == "olmo":
        out.update(rope_theta=theta, clip_qkv=config.clip_qkv)
    else:
        out["rms_norm_eps"] = config.layer_norm_eps
    if arch == "olmo3":
        out.update(sliding_window=config.sliding_window, layer_types=config.attention_types)
    return out


def _first_id(value: Any, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, (list, tuple)):
        return int(value[0])
    return int(value)


# ---------------------------------------------------------------------------------------------- tensor names
# OLMo 2/3's norm weights in a block: ours (allenai/OLMo's with norm_after=True) -> HF's. OLMo's attn_norm and
# ff_norm are the norms after the attention and the MLP there.
_NORMS = (("q_norm.weight", "self_attn.q_norm.weight"), ("k_norm.weight", "self_attn.k_norm.weight"),
          ("attn_norm.weight", "post_attention_layernorm.weight"),
          ("ff_norm.weight", "post_feedforward_layernorm.weight"))


def hf_to_olmo(hf: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensors -> our (= original OLMo) names; q/k/v and gate/up are fused as OLMo fuses them.

    Every tensor must be used: one the config does not account for (more layers than `num_hidden_layers`,
    attention biases, a head beside tied embeddings) means the config does not describe these weights.
    """
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise CheckpointError(f"checkpoint is missing tensor {name!r}")
        used.add(name)
        return hf[name]

    out = {"transformer.wte.weight": take("model.embed_tokens.weight")}
    for i in range(config.n_layers):
        p, o = f"model.layers.{i}.", f"transformer.blocks.{i}."
        out[o + "att_proj.weight"] = torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"], dim=0)
        out[o + "attn_out.weight"] = take(p + "self_attn.o_proj.weight")
        # OLMo's ff_proj output is [up | gate]: the first half is multiplied by silu(second half).
        out[o + "ff_proj.weight"] = torch.cat([take(p + "mlp.up_proj.weight"), take(p + "mlp.gate_proj.weight")], 0)
        out[o + "ff_out.weight"] = take(p + "mlp.down_proj.weight")
        if config.norm_after:
            out.update({o + ours: take(p + theirs) for ours, theirs in _NORMS})
    if config.norm_after:
        out["transformer.ln_f.weight"] = take("model.norm.weight")
    if not config.weight_tying:
        out["transformer.ff_out.weight"] = take("lm_head.weight")
    elif "lm_head.weight" in hf and torch.equal(hf["lm_head.weight"], out["transformer.wte.weight"]):
        used.add("lm_head.weight")  # a tied head written out as a copy of the embedding
    extra = sorted(name for name in set(hf) - used if "rotary_emb" not in name)  # RoPE buffers: recomputed
    if extra:
        raise CheckpointError(
            f"the weights hold {len(extra)} tensor(s) the config does not account for, e.g. {extra[0]!r} (config: "
            f"num_hidden_layers={config.n_layers}, tie_word_embeddings={config.weight_tying}, no biases)")
    return out


def olmo_to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our names -> HF names (the inverse of `hf_to_olmo`)."""
    d, kv = config.d_model, config.n_kv_heads * config.head_dim
    out = {"model.embed_tokens.weight": state["transformer.wte.weight"]}
    for i in range(config.n_layers):
        p, o = f"model.layers.{i}.", f"transformer.blocks.{i}."
        q, k, v = state[o + "att_proj.weight"].split((d, kv, kv), dim=0)
        up, gate = state[o + "ff_proj.weight"].chunk(2, dim=0)
        out.update({
            p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": state[o + "attn_out.weight"],
            p + "mlp.up_proj.weight": up, p + "mlp.gate_proj.weight": gate,
            p + "mlp.down_proj.weight": state[o + "ff_out.weight"],
        })
        if config.norm_after:
            out.update({p + theirs: state[o + ours] for ours, theirs in _NORMS})
    if config.norm_after:
        out["model.norm.weight"] = state["transformer.ln_f.weight"]
    if not config.weight_tying:
        out["lm_head.weight"] = state["transformer.ff_out.weight"]
    return {name: t.contiguous() for name, t in out.items()}
