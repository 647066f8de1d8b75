"""The OLMo model (OLMo 1B / 7B / 1.7-7B), built from `olmo_fast.ops` so every backend runs it.

Parameter names follow allenai/OLMo (`transformer.wte`, `transformer.blocks.{i}.att_proj` ...), so an
original checkpoint's state dict loads as it is; `checkpoint.py` converts to and from HF's names.

Block (OLMo's sequential block, pre-norm, no biases):
    h = LN(x);  q, k, v = RoPE(split(clamp(att_proj(h))));  x = x + attn_out(attention(q, k, v))
    h = LN(x);  x = x + ff_out(silu(gate) * up)  where [up | gate] = ff_proj(h)
Each residual add is fused into the LayerNorm that follows it (`layer_norm(delta, residual=x)`), also across
blocks: a block hands its MLP output to the next block's first norm, the last one to the final `ln_f`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .config import ModelConfig


class KVCache(Protocol):
    """What the model needs of a KV cache (the generator's cache implements it)."""

    rope_offset: int | torch.Tensor  # position of the first new token: an int, or one per sequence ([B])

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k, v of the new tokens for `layer` and return attention of q over all cached tokens."""
        ...


class OLMoBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, backend: str | None = None) -> None:
        super().__init__()
        self.config, self.layer_id, self.backend = config, layer_id, backend
        d = config.d_model
        self.att_proj = nn.Linear(d, config.qkv_size, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(config.intermediate_size, d, bias=False)

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None, cache: KVCache | None = None,
                positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns `(x, delta)`: the residual stream and this block's MLP output, not yet added to it."""
        cfg, backend = self.config, self.backend
        eps = cfg.layer_norm_eps
        if delta is None:
            h = ops.layer_norm(x, eps=eps, backend=backend)
        else:
            h, x = ops.layer_norm(delta, eps=eps, residual=x, backend=backend)
        B, T, _ = x.shape
        q, k, v = ops.qkv_rope(self.att_proj(h), n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, clip=cfg.clip_qkv,
                               positions=positions, offset=0 if cache is None else cache.rope_offset,
                               theta=cfg.rope_theta, backend=backend)
        if cache is None:
            att = ops.attention(q, k, v, causal=True, backend=backend)
        else:
            att = cache.attend(self.layer_id, q, k, v)
        h, x = ops.layer_norm(self.attn_out(att.reshape(B, T, cfg.d_model)), eps=eps, residual=x, backend=backend)
        return x, self.ff_out(ops.swiglu(self.ff_proj(h), backend=backend))

    def reset_parameters(self) -> None:
        """OLMo's "mitchell" init: truncated normal at ±3σ, output projections scaled down with depth."""
        d, depth = self.config.d_model, self.layer_id + 1
        _trunc_normal(self.att_proj.weight, 1 / math.sqrt(d))
        _trunc_normal(self.ff_proj.weight, 1 / math.sqrt(d))
        _trunc_normal(self.attn_out.weight, 1 / math.sqrt(2 * d * depth))
        _trunc_normal(self.ff_out.weight, 1 / math.sqrt(2 * self.config.intermediate_size * depth))


def _trunc_normal(weight: torch.Tensor, std: float) -> None:
    nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-3 * std, b=3 * std)


class OLMo(nn.Module):
    """OLMo causal LM. `model(ids)` -> logits `[B, T, embedding_size]`; `model(ids, labels)` -> `(logits, loss)`.

    `labels` are aligned with `input_ids` (as in HF): position t is scored against labels[t + 1], -100 ignored;
    the loss is the mean over the scored tokens. (The trainer divides summed losses by all tokens, as OLMo.)
    """

    def __init__(self, config: ModelConfig, backend: str | None = None, init: bool = True) -> None:
        super().__init__()
        self.config, self.backend = config, backend
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.embedding_size, config.d_model),
            "blocks": nn.ModuleList(OLMoBlock(config, i, backend) for i in range(config.n_layers)),
        })
        if not config.weight_tying:
            self.transformer["ff_out"] = nn.Linear(config.d_model, config.embedding_size, bias=False)
        self.validate_inputs = True  # generation turns this off after checking the prompt once
        if init:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        std = 1 / math.sqrt(self.config.d_model)
        _trunc_normal(self.transformer["wte"].weight, std)
        if "ff_out" in self.transformer:
            _trunc_normal(self.transformer["ff_out"].weight, std)
        for block in self.transformer["blocks"]:
            block.reset_parameters()

    def set_backend(self, backend: str | None) -> "OLMo":
        """Run every op of the model on `backend` (None: the best available per op and device)."""
        self.backend = backend
        for block in self.transformer["blocks"]:
            block.backend = backend
        return self

    @property
    def head_weight(self) -> torch.Tensor:
        return (self.transformer["wte"] if self.config.weight_tying else self.transformer["ff_out"]).weight

    def check_input_ids(self, input_ids: torch.Tensor, past_length: int = 0) -> None:
        cfg = self.config
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"input_ids must be an integer tensor [batch, seq], got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        if past_length + input_ids.shape[1] > cfg.max_sequence_length:
            raise ValueError(f"sequence length {past_length + input_ids.shape[1]} exceeds the model's context "
                             f"({cfg.max_sequence_length} tokens)")
        if input_ids.numel():
            low, high = torch.stack(torch.aminmax(input_ids)).tolist()  # one reduction, one device sync
            if low < 0 or high >= cfg.embedding_size:
                raise ValueError(f"token ids must lie in [0, {cfg.embedding_size}); got ids from {low} to {high}")

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                      positions: torch.Tensor | None = None) -> torch.Tensor:
        """The final-normed hidden states `[B, T, d_model]` (the head's input)."""
        x = self.transformer["wte"](input_ids)
        delta = None
        for block in self.transformer["blocks"]:
            x, delta = block(x, delta, cache, positions)
        h, _ = ops.layer_norm(delta, eps=self.config.layer_norm_eps, residual=x, backend=self.backend)
        return h

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                cache: KVCache | None = None, positions: torch.Tensor | None = None):
        if self.validate_inputs:
            self.check_input_ids(input_ids)
        h = self.hidden_states(input_ids, cache, positions)
        logits = F.linear(h, self.head_weight)
        if labels is None:
            return logits
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
        shifted = labels[:, 1:].reshape(-1)
        loss = ops.reference.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), shifted)
        return logits, loss

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None, device: Any = None,
                        backend: str | None = None) -> "OLMo":
        """Load an HF OLMo directory or an original OLMo checkpoint directory (see `checkpoint.py`)."""
        from .checkpoint import load_model

        return load_model(cls, path, dtype=dtype, device=device, backend=backend)

    def save_pretrained(self, path: str | Path, max_shard_bytes: int = 5 * 2**30) -> None:
        """Write the HF layout (`config.json` + safetensors), loadable by `OlmoForCausalLM.from_pretrained`."""
        from .checkpoint import save_hf

        save_hf(self, path, max_shard_bytes=max_shard_bytes)
