"""Replacement forwards for transformers' module classes (OLMo, OLMo2, Llama, Mistral, Qwen2), used by
`olmo_fast.patch`'s table.

Each factory takes the class's original forward and the patch `Options`, and returns a function with the
original's signature that runs olmo_fast's ops on the module's own parameters and attributes: nothing is
copied or re-registered, so state dicts, hooks, optimizers and `isinstance` checks see the same model. Where a
fused op does not apply (below), the function does what transformers does.

- norms: `ops.layer_norm` (OlmoLayerNorm, eps 1e-5 as in transformers) / `ops.rms_norm` (*RMSNorm). The RMSNorm
  weight multiplies in fp32 before the cast to x's dtype (OLMo2's order; Llama casts first: the two differ in
  the last bit in half precision, not in fp32) and the output keeps x's dtype.
- MLP: `ops.silu_mul` when `config.hidden_act` is silu/swish.
- attention: RoPE by `ops.rope` from `position_ids` when `rope_parameters` is the default kind (no scaling);
  `ops.attention` when transformers built no mask (sdpa's causal skip: no padding, no packing), the window
  (if any) covers all keys and there is no dropout; otherwise the model's own attention implementation runs.
- causal LM: with labels and `skip_logits` (default: in training), the loss is `nn.causal_lm_loss` (fused:
  `ops.linear_cross_entropy`; the loss path of `OLMo.forward` and the trainer) on the final hidden states and
  the output's `logits` is None; otherwise transformers' own forward runs.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import ops
from ..nn.loss import causal_lm_loss, next_token_labels


@dataclass(frozen=True)
class Options:
    """Which fused ops a patch puts in, and on which backend (None: the best per op and device)."""

    rope: bool = True
    swiglu: bool = True
    norm: bool = True
    attention: bool = True
    cross_entropy: bool = True
    backend: str | None = None


def layer_norm_forward(original: Callable, opts: Options) -> Callable:
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(hidden_states, eps=1e-5, backend=opts.backend)

    return forward


def rms_norm_forward(original: Callable, opts: Options) -> Callable:
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(hidden_states, self.weight, eps=self.variance_epsilon, backend=opts.backend)

    return forward


def swiglu_mlp_forward(original: Callable, opts: Options) -> Callable:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.hidden_act not in ("silu", "swish"):
            return original(self, x)
        return self.down_proj(ops.silu_mul(self.gate_proj(x), self.up_proj(x), backend=opts.backend))

    return forward


def default_rope_theta(config) -> float | None:
    """The RoPE base if the config uses plain RoPE (what `ops.rope` computes), else None."""
    params = getattr(config, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default" or getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        return None
    return params.get("rope_theta", getattr(config, "rope_theta", None))


def attention_forward(original: Callable, opts: Options) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    modeling = sys.modules[original.__module__]  # the family's modeling_*.py: its rotation and eager attention

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None, cache=None, **kwargs):
        cache = kwargs.pop("past_key_values", cache)
        config = self.config
        heads_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        clip = getattr(config, "clip_qkv", None)  # OLMo 1.7: clamp the projections before RoPE
        if clip is not None:
            q, k, v = (ops.clip_qkv(t, clip) for t in (q, k, v))
        if hasattr(self, "q_norm"):  # OLMo2: RMSNorm over all heads' q and k
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(heads_shape) for t in (q, k, v))  # [B, T, H, D]

        theta, position_ids = default_rope_theta(config), kwargs.get("position_ids")
        if opts.rope and theta is not None and position_ids is not None:
            positions = position_ids[0] if position_ids.shape[0] == 1 else position_ids
            q, k = ops.rope(q, k, positions=positions, theta=theta, backend=opts.backend)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        else:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            cos, sin = position_embeddings
            q, k = modeling.apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)

        window = getattr(self, "sliding_window", getattr(config, "sliding_window", None))
        dropout = self.attention_dropout if self.training else 0.0
        if (opts.attention and attention_mask is None and dropout == 0.0
                and (window is None or k.shape[2] <= window)):
            out = ops.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                                scale=self.scaling, backend=opts.backend)
            weights = None
        else:
            interface = ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation,
                                                              modeling.eager_attention_forward)
            out, weights = interface(self, q, k, v, attention_mask, dropout=dropout, scaling=self.scaling,
                                     sliding_window=window, **kwargs)
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1)), weights

    return forward


def causal_lm_forward(original: Callable, opts: Options) -> Callable:
    """`*ForCausalLM.forward` taking one more keyword, `skip_logits` (default: `self.training`): with labels
    and `skip_logits`, the loss comes from the fused `causal_lm_loss` and `logits` is None."""
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.utils import can_return_tuple

    # the outputs' KV cache: `cache` in recent transformers, `past_key_values` before (5.17 has only that)
    cache_field = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

    @can_return_tuple
    def fused_loss(self, *args, labels: torch.Tensor | None, shift_labels: torch.Tensor | None = None,
                   logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        outputs = self.model(*args, **kwargs)
        hidden = outputs.last_hidden_state
        if shift_labels is None:  # position t predicts labels[t + 1]; the last position has no target
            shift_labels = next_token_labels(labels)
        num_items = kwargs.get("num_items_in_batch")
        _, loss = causal_lm_loss(hidden, self.lm_head.weight, shift_labels.to(hidden.device),
                                 reduction="mean" if num_items is None else "sum", backend=opts.backend)
        if num_items is not None:
            loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
        return CausalLMOutputWithPast(loss=loss, logits=None, **{cache_field: getattr(outputs, cache_field)},
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    def forward(self, *args, labels: torch.Tensor | None = None, skip_logits: bool | None = None, **kwargs):
        keep = kwargs.get("logits_to_keep", 0)
        if ((self.training if skip_logits is None else skip_logits)
                and (labels is not None or kwargs.get("shift_labels") is not None)
                and len(args) <= 5  # input_ids .. inputs_embeds, as the base model takes them; then labels
                and self.lm_head.bias is None and isinstance(keep, int) and keep == 0):
            return fused_loss(self, *args, labels=labels, **kwargs)
        return original(self, *args, labels=labels, **kwargs)

    return forward
