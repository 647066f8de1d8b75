"""A KV cache for scoring many continuations of a few shared contexts (implements `olmo_fast.model.KVCache`).

Two kinds of forward per batch of contexts:
1. prefill: the contexts, right-padded `[B, L]`; each layer's k/v are kept and attention is plain causal
   (a real token never sees the padding after it).
2. continuations `[N, T]` (right-padded), row n continuing context `rows[n]` of `lengths[rows[n]]` tokens:
   RoPE starts at that length; per layer the row's keys are laid out as
       slots 0 .. len-1: its context's k/v;   slots len .. len+T-1: the new tokens' k/v
   (`[N, L + T, Hkv, D]`, gathered and written per forward, transient) and decode attention over
   `seqlens = len + T` keys lets new token t see the context and new tokens 0..t. A padded row's extra new
   tokens only produce outputs nobody reads. The context is never recomputed.
The cache holds tensors only: the block's attention module attends over what `update` returns.
"""
from __future__ import annotations

import torch


class PrefixCache:
    def __init__(self) -> None:
        self.k: list[torch.Tensor] = []  # per layer, the contexts' keys [B, L, Hkv, D]
        self.v: list[torch.Tensor] = []
        self.rows: torch.Tensor | None = None  # [N] context row of each continuation (None: prefill)
        # Of the continuation forward, computed once for all its layers:
        self._starts: torch.Tensor | None = None  # [N] each row's context length: its first new token's position
        self._row_index: torch.Tensor | None = None  # [N, 1] 0 .. N-1, to scatter each row's new k/v
        self._slots: torch.Tensor | None = None  # [N, T] where each row's new tokens go
        self._seqlens: torch.Tensor | None = None  # [N] keys each row attends over

    @property
    def rope_offset(self) -> int | torch.Tensor:
        return 0 if self.rows is None else self._starts

    def continue_from(self, rows: torch.Tensor, lengths: torch.Tensor, new_tokens: int) -> None:
        """End the prefill: the next forward holds `new_tokens` continuation tokens per row of `rows`, continuing
        contexts of `lengths` ([B]) tokens."""
        self.rows = rows
        self._starts = lengths[rows]
        self._row_index = torch.arange(len(rows), device=rows.device).view(-1, 1)
        self._slots = self._starts.view(-1, 1) + torch.arange(new_tokens, device=rows.device)
        self._seqlens = (self._starts + new_tokens).to(torch.int32)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Keys, values and key counts to attend over (None: causal over the new tokens alone)."""
        if self.rows is None:
            self.k.append(k)
            self.v.append(v)
            return k, v, None
        keys, values = (torch.cat([cached[layer][self.rows], torch.zeros_like(new)], dim=1)
                        for cached, new in ((self.k, k), (self.v, v)))
        keys[self._row_index, self._slots] = k
        values[self._row_index, self._slots] = v
        return keys, values, self._seqlens
