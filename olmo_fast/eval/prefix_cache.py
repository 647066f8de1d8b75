"""A KV cache for scoring many continuations of a few shared contexts (implements `olmo_fast.model.KVCache`).

Two forwards per batch of contexts:
1. prefill: the contexts, right-padded `[B, L]`; each layer's k/v are kept and attention is plain causal
   (a real token never sees the padding after it).
2. continuations `[N, T]`, row n continuing context `rows[n]` of `lengths[rows[n]]` tokens: RoPE starts at
   that length, and query t attends to its context's real keys and to continuation keys 0..t:
       softmax(q k^T / sqrt(D) + mask) v   over keys = [context k of rows[n] (L slots) | new k (T slots)]
   The context's k/v are gathered per row (N x L x Hkv x D per layer, transient), never recomputed.
Plain PyTorch attention (`scaled_dot_product_attention` with a boolean mask), so any device runs it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops


class PrefixCache:
    def __init__(self, backend: str | None = None) -> None:
        self.backend = backend
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.rows: torch.Tensor | None = None  # [N] context row of each continuation (None: prefill)
        self.lengths: torch.Tensor | None = None  # [B] real tokens per context
        self._mask: torch.Tensor | None = None

    @property
    def rope_offset(self) -> int | torch.Tensor:
        return 0 if self.rows is None else self.lengths[self.rows]

    def continue_from(self, rows: torch.Tensor, lengths: torch.Tensor, new_tokens: int) -> None:
        """End the prefill: the next forward holds `new_tokens` continuation tokens per row of `rows`."""
        self.rows, self.lengths = rows, lengths
        slots = self.k[0].shape[1]
        context_ok = torch.arange(slots, device=rows.device) < lengths[rows].view(-1, 1)  # [N, L]
        causal = torch.ones(new_tokens, new_tokens, dtype=torch.bool, device=rows.device).tril()  # [T, T]
        self._mask = torch.cat([context_ok[:, None, :].expand(-1, new_tokens, -1),
                                causal.expand(len(rows), -1, -1)], dim=2)[:, None]  # [N, 1, T, L + T]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.rows is None:
            self.k.append(k)
            self.v.append(v)
            return ops.attention(q, k, v, causal=True, backend=self.backend)
        keys = torch.cat([self.k[layer][self.rows], k], dim=1)
        values = torch.cat([self.v[layer][self.rows], v], dim=1)
        groups = q.shape[2] // k.shape[2]
        if groups > 1:
            keys, values = keys.repeat_interleave(groups, dim=2), values.repeat_interleave(groups, dim=2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                             attn_mask=self._mask)
        return out.transpose(1, 2)
