"""Summed log-probabilities of each request's continuation: OLMo's scheme and the shared-context one.

- `naive`: as OLMo scores them, one sequence per choice (context + continuation[:-1], right-padded) through
  `model(input_ids)`; the context is recomputed once per choice.
- `shared` (default): each distinct context runs once (a batch of contexts, longest first, through a
  `PrefixCache`); its last position scores every continuation's first token (a one-token continuation, e.g.
  MMLU's " A", needs nothing more), then the distinct continuations' remaining tokens run as one more batch
  attending to their context's cached keys. Work per document: ~1 context + its continuations, not
  n_choices x (context + continuation); and the LM head (d x vocab per position: most of a small model's
  work) runs only at the scored positions (`model.hidden_states`, then `model.head_weight`).
Batches hold at most `batch_tokens` padded tokens (rows x longest row; a longer single row runs alone); a
continuation batch also gathers its rows' cached contexts, at most (choices per document) x its context batch.
Log-probabilities are taken in float32 of the logits at the scored positions only.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from .prefix_cache import PrefixCache
from .requests import Request

Progress = Callable[[int], None]  # called with the number of requests just finished


def _token_logprobs(logits: torch.Tensor, targets: list[int]) -> torch.Tensor:
    """log softmax(logits[i])[targets[i]] in float32, for `logits` [M, V]."""
    index = torch.tensor(targets, device=logits.device).view(-1, 1)
    return F.log_softmax(logits.float(), dim=-1).gather(1, index).view(-1)


def _pad(rows: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


def _batches(widths: Sequence[int], batch_tokens: int) -> Iterable[list[int]]:
    """Consecutive index runs whose count x widest row stays within `batch_tokens` (at least one row each)."""
    batch: list[int] = []
    widest = 0
    for i, width in enumerate(widths):
        if batch and (len(batch) + 1) * max(widest, width) > batch_tokens:
            yield batch
            batch, widest = [], 0
        batch.append(i)
        widest = max(widest, width)
    if batch:
        yield batch


def _head(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on the scored positions' final hidden states only, `[M, d]` -> logits `[M, V]`."""
    return F.linear(hidden, model.head_weight)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def naive_loglikelihoods(model: torch.nn.Module, requests: Sequence[Request], batch_tokens: int = 2048,
                         progress: Progress | None = None) -> torch.Tensor:
    """OLMo's scheme: one sequence per request, in the given order. Returns float32 [len(requests)]."""
    device = _device(model)
    queries = [r.context + r.continuation[:-1] for r in requests]
    out = torch.empty(len(requests), dtype=torch.float32)
    for batch in _batches([len(q) for q in queries], batch_tokens):
        logits = model(_pad([queries[i] for i in batch], device))
        rows, positions, targets, owner = [], [], [], []
        for b, i in enumerate(batch):
            r = requests[i]
            start = len(r.context) - 1
            rows += [b] * len(r.continuation)
            positions += range(start, start + len(r.continuation))
            targets += r.continuation
            owner += [b] * len(r.continuation)
        logp = _token_logprobs(logits[rows, positions], targets).cpu()
        sums = torch.zeros(len(batch), dtype=torch.float32).index_add_(0, torch.tensor(owner), logp)
        out[batch] = sums
        if progress:
            progress(len(batch))
    return out


@torch.no_grad()
def shared_loglikelihoods(model: torch.nn.Module, requests: Sequence[Request], batch_tokens: int = 2048,
                          progress: Progress | None = None) -> torch.Tensor:
    """Each distinct context computed once. Returns float32 [len(requests)], as `naive_loglikelihoods`."""
    device = _device(model)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(r.context, []).append(i)
    contexts = sorted(groups, key=len, reverse=True)
    first = torch.empty(len(requests), dtype=torch.float32)
    rest = torch.zeros(len(requests), dtype=torch.float32)
    for batch in _batches([len(c) for c in contexts], batch_tokens):
        cache = PrefixCache()
        batch_contexts = [contexts[j] for j in batch]
        lengths = torch.tensor([len(c) for c in batch_contexts], device=device)
        hidden = model.hidden_states(_pad(batch_contexts, device), cache=cache)
        last = _head(model, hidden[torch.arange(len(batch), device=device), lengths - 1])
        members = [(b, i) for b, c in enumerate(batch_contexts) for i in groups[c]]
        logp = _token_logprobs(last[[b for b, _ in members]], [requests[i].continuation[0] for _, i in members])
        first[[i for _, i in members]] = logp.cpu()
        _score_continuations(model, cache, lengths, members, requests, rest, batch_tokens, device)
        if progress:
            progress(len(members))
    return first + rest


def _score_continuations(model: torch.nn.Module, cache: PrefixCache, lengths: torch.Tensor,
                         members: list[tuple[int, int]], requests: Sequence[Request], out: torch.Tensor,
                         batch_tokens: int, device: torch.device) -> None:
    """out[i] = log-prob of continuation i's tokens after its first, for the requests of one context batch;
    identical (context, continuation) pairs run once."""
    distinct: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    for b, i in members:
        if len(requests[i].continuation) > 1:
            distinct.setdefault((b, requests[i].continuation), []).append(i)
    keys = sorted(distinct, key=lambda key: len(key[1]))
    for chunk in _batches([len(c) - 1 for _, c in keys], batch_tokens):
        rows = [keys[j] for j in chunk]
        inputs = _pad([c[:-1] for _, c in rows], device)
        cache.continue_from(torch.tensor([b for b, _ in rows], device=device), lengths, inputs.shape[1])
        hidden = model.hidden_states(inputs, cache=cache)
        flat_rows, positions, targets, owner = [], [], [], []
        for n, (_, c) in enumerate(rows):
            flat_rows += [n] * (len(c) - 1)
            positions += range(len(c) - 1)
            targets += c[1:]
            owner += [n] * (len(c) - 1)
        logp = _token_logprobs(_head(model, hidden[flat_rows, positions]), targets).cpu()
        sums = torch.zeros(len(rows), dtype=torch.float32).index_add_(0, torch.tensor(owner), logp)
        for n, key in enumerate(rows):
            out[distinct[key]] = sums[n]
