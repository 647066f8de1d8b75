"""The OLMo model (OLMo 1B / 7B / 1.7-7B, OLMo 2 and OLMo 3), built from `olmo_fast.nn` modules (each on one op of
`olmo_fast.ops`, holding its backend), so every backend runs it.

Parameter names follow allenai/OLMo (`transformer.blocks.{i}.att_proj` ...), so an original checkpoint's state
dict loads as it is; `hf_names.py` maps them to and from HF's names. The nn modules hold no parameters, except
OLMo 2/3's norms, which hold their weights.

Block (OLMo's sequential block, pre-norm, no biases):
    h = attn_norm(x);  q, k, v = rotary(att_proj(h))  (clamp, split, RoPE);  x = x + attn_out(attention(q, k, v))
    h = ff_norm(x);  x = x + ff_out(act(ff_proj(h)))  with act([up | gate]) = silu(gate) * up
Each residual add is fused into the LayerNorm that follows it (`norm(delta, residual=x)`), also across blocks: a
block hands its MLP output to the next block's `attn_norm`, the last one to the final `ln_f`.

OLMo 2/3 block (`config.norm_after`: norms after the sublayers, RMSNorm with weights, QK-norm, no clipping):
    q, k, v = rope(q_norm(q), k_norm(k)) of att_proj(x);  x = x + attn_norm(attn_out(attention(q, k, v)))
    x = x + ff_norm(ff_out(act(ff_proj(x))))
with the QK-norm fused into RoPE (`QKNormRope`), each norm fused with its residual add (`RMSNormAdd`), and
attention over the layer's window on OLMo 3's sliding layers; the final `ln_f` is an RMSNorm with a weight.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .nn import Attention, CausalLMLoss, LayerNorm, QKNormRope, QKVRope, RMSNorm, RMSNormAdd, SwiGLU, set_backend


class KVCache(Protocol):
    """What the model needs of a KV cache (the generator's cache implements it): it holds the tensors, the
    block's attention module attends over them."""

    rope_offset: int | torch.Tensor  # position of the first new token: an int, or one per sequence ([B])

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store k, v `[B, T, Hkv, D]` of the new tokens for `layer`; return the keys and values to attend over
        and their counts per sequence `[B]` (`Attention`'s decoding form), or `(k, v, None)` to attend causally
        over the new tokens alone."""
        ...


class OLMoBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, backend: str | None = None) -> None:
        super().__init__()
        self.config, self.layer_id = config, layer_id
        d, eps = config.d_model, config.layer_norm_eps
        self.attn_norm = LayerNorm(eps=eps, backend=backend)
        self.att_proj = nn.Linear(d, config.qkv_size, bias=False)
        self.rotary = QKVRope(config.n_heads, config.n_kv_heads, clip=config.clip_qkv, theta=config.rope_theta,
                              backend=backend)
        self.attention = Attention(causal=True, backend=backend)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_norm = LayerNorm(eps=eps, backend=backend)
        self.ff_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.act = SwiGLU(backend=backend)
        self.ff_out = nn.Linear(config.intermediate_size, d, bias=False)

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None, cache: KVCache | None = None,
                positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns `(x, delta)`: the residual stream and this block's MLP output, not yet added to it."""
        if delta is None:
            h = self.attn_norm(x)
        else:
            h, x = self.attn_norm(delta, residual=x)
        q, k, v = self.rotary(self.att_proj(h), positions=positions, offset=0 if cache is None else cache.rope_offset)
        seqlens = None
        if cache is not None:
            k, v, seqlens = cache.update(self.layer_id, k, v)
        att = self.attention(q, k, v, seqlens)
        h, x = self.ff_norm(self.attn_out(att.flatten(2)), residual=x)
        return x, self.ff_out(self.act(self.ff_proj(h)))

    def reset_parameters(self) -> None:
        """OLMo's "mitchell" init: truncated normal at ±3σ, output projections scaled down with depth."""
        d, depth = self.config.d_model, self.layer_id + 1
        _trunc_normal(self.att_proj.weight, 1 / math.sqrt(d))
        _trunc_normal(self.ff_proj.weight, 1 / math.sqrt(d))
        _trunc_normal(self.attn_out.weight, 1 / math.sqrt(2 * d * depth))
        _trunc_normal(self.ff_out.weight, 1 / math.sqrt(2 * self.config.intermediate_size * depth))


class OLMo2Block(nn.Module):
    """OLMo 2/3's block (see the module docstring); same interface as `OLMoBlock`, with nothing handed on: the
    residual adds are fused into the post-norms, so `forward` returns `(x, None)`."""

    def __init__(self, config: ModelConfig, layer_id: int, backend: str | None = None) -> None:
        super().__init__()
        self.config, self.layer_id = config, layer_id
        d, eps, kv = config.d_model, config.layer_norm_eps, config.n_kv_heads * config.head_dim
        self.att_proj = nn.Linear(d, config.qkv_size, bias=False)
        # q_norm / k_norm hold the QK-norm weights (allenai/OLMo's names); `rotary` applies them fused with RoPE.
        self.q_norm = RMSNorm(d, eps=eps, backend=backend)
        self.k_norm = RMSNorm(kv, eps=eps, backend=backend)
        self.rotary = QKNormRope(config.n_heads, config.n_kv_heads, eps=eps, theta=config.rope_theta,
                                 rope_scaling=config.layer_rope_scaling(layer_id), backend=backend)
        self.attention = Attention(causal=True, window=config.layer_window(layer_id), backend=backend)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.attn_norm = RMSNormAdd(d, eps=eps, backend=backend)
        self.ff_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.act = SwiGLU(backend=backend)
        self.ff_out = nn.Linear(config.intermediate_size, d, bias=False)
        self.ff_norm = RMSNormAdd(d, eps=eps, backend=backend)

    def forward(self, x: torch.Tensor, delta: None = None, cache: KVCache | None = None,
                positions: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        q, k, v = self.rotary(self.att_proj(x), self.q_norm.weight, self.k_norm.weight, positions=positions,
                              offset=0 if cache is None else cache.rope_offset)
        seqlens = None
        if cache is not None:
            k, v, seqlens = cache.update(self.layer_id, k, v)
        x = self.attn_norm(self.attn_out(self.attention(q, k, v, seqlens).flatten(2)), x)
        return self.ff_norm(self.ff_out(self.act(self.ff_proj(x))), x), None

    def reset_parameters(self) -> None:
        """OLMo 2's init (OLMo-core's and allenai/OLMo's "normal"): every matrix truncated normal with std
        `init_std` (0.02) at ±3σ, the norms' weights ones."""
        for linear in (self.att_proj, self.attn_out, self.ff_proj, self.ff_out):
            _trunc_normal(linear.weight, self.config.init_std)
        for norm in (self.q_norm, self.k_norm, self.attn_norm, self.ff_norm):
            nn.init.ones_(norm.weight)


def _trunc_normal(weight: torch.Tensor, std: float) -> None:
    nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-3 * std, b=3 * std)


class OLMo(nn.Module):
    """OLMo causal LM; see `forward`. `backend` (None: the best available per op and device) is held by each of its
    `olmo_fast.nn` modules; `set_backend` changes them all."""

    def __init__(self, config: ModelConfig, backend: str | None = None, init: bool = True) -> None:
        super().__init__()
        self.config = config
        block, eps = OLMo2Block if config.norm_after else OLMoBlock, config.layer_norm_eps
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.embedding_size, config.d_model),
            "blocks": nn.ModuleList(block(config, i, backend) for i in range(config.n_layers)),
            "ln_f": (RMSNorm(config.d_model, eps=eps, backend=backend) if config.norm_after
                     else LayerNorm(eps=eps, backend=backend)),
        })
        if not config.weight_tying:
            self.transformer["ff_out"] = nn.Linear(config.d_model, config.embedding_size, bias=False)
        self.loss = CausalLMLoss(backend=backend)
        if init:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """OLMo 1: mitchell (embedding and head std 1/sqrt(d)); OLMo 2/3: std `init_std` everywhere, norms ones."""
        std = self.config.init_std if self.config.norm_after else 1 / math.sqrt(self.config.d_model)
        if self.config.norm_after:
            nn.init.ones_(self.transformer["ln_f"].weight)
        _trunc_normal(self.transformer["wte"].weight, std)
        if "ff_out" in self.transformer:
            _trunc_normal(self.transformer["ff_out"].weight, std)
        for block in self.transformer["blocks"]:
            block.reset_parameters()

    def set_backend(self, backend: str | None) -> OLMo:
        """Run every op of the model on `backend` (None: the best available per op and device), a KV cache's
        decoding included (the cache holds tensors only)."""
        return set_backend(self, backend)

    @property
    def head_weight(self) -> torch.Tensor:
        return (self.transformer["wte"] if self.config.weight_tying else self.transformer["ff_out"]).weight

    def check_inputs(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """ValueError unless `input_ids` is an integer `[batch, seq]` of vocabulary ids that fits the context and
        `labels` (if given) has its shape with ids in the vocabulary or -100. One device sync."""
        cfg = self.config
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"input_ids must be an integer tensor [batch, seq], got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        if input_ids.shape[1] > cfg.max_sequence_length:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds the model's context "
                             f"({cfg.max_sequence_length} tokens)")
        if labels is not None and (labels.shape != input_ids.shape or labels.dtype not in (torch.int32, torch.int64)):
            raise ValueError(f"labels must be an integer tensor of input_ids' shape {tuple(input_ids.shape)}, got "
                             f"{labels.dtype} {tuple(labels.shape)}")
        if not input_ids.numel():
            return
        ranges = [*torch.aminmax(input_ids)]
        if labels is not None:  # -100 (ignored) maps into the range; one stack, one sync for all four
            scored = torch.where(labels == -100, 0, labels)
            ranges += [*torch.aminmax(scored)]
        bounds = torch.stack(ranges).tolist()
        if bounds[0] < 0 or bounds[1] >= cfg.embedding_size:
            raise ValueError(f"token ids must lie in [0, {cfg.embedding_size}); got ids from {bounds[0]} to "
                             f"{bounds[1]}")
        if labels is not None and (bounds[2] < 0 or bounds[3] >= cfg.embedding_size):
            raise ValueError(f"labels must lie in [0, {cfg.embedding_size}) or be -100; got labels from {bounds[2]} "
                             f"to {bounds[3]}")

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                      positions: torch.Tensor | None = None) -> torch.Tensor:
        """The final-normed hidden states `[B, T, d_model]` (the head's input). Inputs are not checked (see
        `check_inputs`)."""
        x = self.transformer["wte"](input_ids)
        delta = None
        for block in self.transformer["blocks"]:
            x, delta = block(x, delta, cache, positions)
        if delta is None:  # OLMo 2/3: every residual add is done
            return self.transformer["ln_f"](x)
        h, _ = self.transformer["ln_f"](delta, residual=x)
        return h

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *, reduction: str = "mean",
                fused: bool = False, check_inputs: bool = True, cache: KVCache | None = None,
                positions: torch.Tensor | None = None, z_loss: float = 0.0, return_z_loss: bool = False):
        """`model(ids)` -> logits `[B, T, embedding_size]`; `model(ids, labels)` -> `(logits, loss)`.

        `labels` are aligned with `input_ids` (as in HF): position t is scored against `labels[:, t + 1]`, -100
        ignored; the loss is fp32, the mean over the scored tokens (`reduction="mean"`) or their sum ("sum"; the
        trainer divides summed losses by all tokens, as OLMo). `fused`: the loss by `ops.linear_cross_entropy`
        without materialising the logits, which come back as None: `(None, loss)`. Both go through
        `olmo_fast.nn.causal_lm_loss`, as the patched transformers models do.

        `check_inputs` (one device sync): ValueError for ids or labels out of the vocabulary, a wrong dtype or
        shape, or a sequence longer than the context; callers that checked their data once (the trainer, the
        generator) pass False. `cache` / `positions`: decoding with a KV cache, explicit RoPE positions.
        `z_loss`: OLMo-core's z-loss multiplier, `z_loss * logsumexp(logits)^2` per scored token added to the loss
        (same reduction); `return_z_loss`: `(logits, loss, z_term)`, z_term that part of the loss alone (detached).
        """
        if check_inputs:
            self.check_inputs(input_ids, labels)
        h = self.hidden_states(input_ids, cache, positions)
        if labels is None:
            return F.linear(h, self.head_weight)
        return self.loss(h, self.head_weight, labels, reduction=reduction, fused=fused, check_labels=False,
                         z_loss=z_loss, return_z_loss=return_z_loss)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None, device: Any = None,
                        backend: str | None = None, trust_pickle: bool = False) -> OLMo:
        """Load an HF OLMo directory or an original OLMo checkpoint directory (see `checkpoint.py`). Weights in a
        pickle (pytorch_model.bin, model.pt) are refused unless `trust_pickle`: reading a pickle can run code."""
        from .checkpoint import load_model

        return load_model(cls, path, dtype=dtype, device=device, backend=backend, trust_pickle=trust_pickle)

    def save_pretrained(self, path: str | Path, max_shard_bytes: int = 5 * 2**30) -> None:
        """Write the HF layout (`config.json` + safetensors), loadable by `OlmoForCausalLM.from_pretrained`."""
        from .checkpoint import save_hf

        save_hf(self, path, max_shard_bytes=max_shard_bytes)
