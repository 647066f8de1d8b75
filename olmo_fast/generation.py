"""Text generation: batched prefill + KV-cache decoding, greedy or sampled, with streaming and stop rules.

`generate(model, prompts, ...)` -> one `Completion` per prompt. The pieces:
- `Decoder`: a static KV cache for a batch, a ragged right-padded prefill, and a decode step that runs the
  model on one token per sequence. On CUDA the step is captured once as a CUDA graph (static token and
  active-mask buffers; the cache's `lengths` tensor is advanced in place inside the graph) and replayed; on
  the CPU (or with `cuda_graph=False`) the very same step function runs eagerly.
- `sample`: greedy argmax, or temperature -> top-k -> top-p, drawn with the exponential trick from a
  `torch.Generator` on the model's device (reproducible from `seed`); ids >= `vocab_size` (embedding padding)
  are never produced.
- `_TextState`: incremental detokenization (text is emitted once it no longer ends in a partial character)
  and stop strings, held back while they may still be completing.
(`benchmark_decode`, decode throughput on a `Decoder`, is in `olmo_fast.benchmarks.decode_bench`.)
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .kv_cache import StaticKVCache

_FROM_CONFIG: Any = object()  # default of `eos_token_id`: the model config's EOS id


@dataclass
class Completion:
    """The new tokens of one prompt. `tokens` end with the EOS token or the token that completed a stop
    string when one ended the sequence; `text` (with a tokenizer) leaves out special tokens and the stop
    string. `finish_reason`: "eos", "stop" (a stop string), "length" (max_new_tokens) or "context" (the
    model's context is full)."""

    tokens: list[int]
    text: str | None
    finish_reason: str


# ---------------------------------------------------------------------------------------------- decoding
class Decoder:
    """A batch of `batch_size` sequences of at most `max_length` tokens each, decoded one token per step. The
    token ids it is fed are not checked (no host sync in a step): `generate` checks the prompts once, and sampled
    ids lie in the vocabulary."""

    def __init__(self, model: torch.nn.Module, batch_size: int, max_length: int,
                 cuda_graph: bool | None = None) -> None:
        weight = model.head_weight
        self.model, self.device = model, weight.device
        self.cache = StaticKVCache(model.config, batch_size, max_length, self.device, weight.dtype)
        self.use_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        if self.use_graph and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self._tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self._active = torch.zeros(batch_size, dtype=torch.int32, device=self.device)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._logits: torch.Tensor | None = None

    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Run right-padded prompts `ids` [B, T] (sequence b's tokens in columns `0 .. lengths[b]-1`) into the
        cache; returns fp32 logits [B, V] of each prompt's last token."""
        hidden = self.model.hidden_states(ids, self.cache)
        lengths = lengths.to(self.device)
        last = hidden[torch.arange(ids.shape[0], device=self.device), lengths.long() - 1]
        self.cache.start(lengths)
        return F.linear(last, self.model.head_weight).float()

    def _run(self) -> torch.Tensor:
        logits = self.model(self._tokens, cache=self.cache, check_inputs=False)[:, -1].float()
        self.cache.advance(self._active)
        return logits

    def step(self, tokens: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Feed one token per sequence ([B]); sequences with `active[b] == 0` do not advance (their step is
        computed and must be ignored). Returns fp32 logits [B, V], valid until the next call."""
        self._tokens.copy_(tokens.view(-1, 1))
        self._active.copy_(active)
        if not self.use_graph:
            return self._run()
        if self._graph is None:
            self._capture()  # runs with `active` zeroed
            self._active.copy_(active)
            if self._graph is None:  # capture failed: decode eagerly from now on
                return self._run()
        self._graph.replay()
        return self._logits

    def _capture(self) -> None:
        """Warm up (Triton compiles, autotunes) and capture `_run` with `active` zeroed, so neither touches a
        sequence's state: a non-advancing step only rewrites the slot the next real step overwrites first."""
        self._active.zero_()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._run()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._logits = self._run()
            self._graph = graph
        except Exception as err:  # e.g. an op that synchronizes: not capturable; the eager step still works
            warnings.warn(f"CUDA graph capture of the decode step failed ({err}); decoding without a graph",
                          stacklevel=2)
            torch.cuda.synchronize(self.device)
            self.use_graph = False


def sample(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0,
           generator: torch.Generator | None = None, vocab_size: int | None = None) -> torch.Tensor:
    """Next tokens [B] from logits [B, V]: argmax when `temperature == 0`, else a draw from
    softmax(logits / temperature) restricted to the `top_k` most likely and to the smallest set whose
    probability reaches `top_p`. Ids >= `vocab_size` are excluded."""
    logits = logits.float()
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits = logits.clone()
        logits[:, vocab_size:] = -math.inf
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # the tokens before it already reach top_p
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, -math.inf))
    probs = logits.softmax(dim=-1)
    # argmax(p / E) with E ~ Exp(1) is a draw from p, without the host sync of torch.multinomial; E is kept
    # off 0 so that a token of probability 0 gives 0 / E = 0, never nan or inf.
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator).clamp_min_(torch.finfo(probs.dtype).tiny)
    return (probs / noise).argmax(dim=-1)


# ---------------------------------------------------------------------------------------------- text
def _encode(tokenizer: Any, text: str) -> list[int]:
    encoded = tokenizer.encode(text, add_special_tokens=False)
    return list(getattr(encoded, "ids", encoded))  # tokenizers.Encoding or an HF tokenizer's list


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


class _TextState:
    """One sequence's text, built token by token with vLLM's prefix/read offsets: the text of the tokens
    after `read` is the decode of `tokens[prefix:]` minus that of `tokens[prefix:read]`, taken only once it
    does not end in an incomplete character. Stop strings end the text; a tail that may be the start of a
    stop string is held back from the stream."""

    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.tokens: list[int] = []
        self.text, self.emitted, self.stopped = "", 0, False
        self._prefix = self._read = 0

    def push(self, token: int) -> None:
        self.tokens.append(token)
        before = _decode(self.tokenizer, self.tokens[self._prefix:self._read])
        after = _decode(self.tokenizer, self.tokens[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return
        searched_from = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self.text += after[len(before):]
        self._prefix, self._read = self._read, len(self.tokens)
        hits = [i for i in (self.text.find(s, searched_from) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True

    def finish(self) -> str:
        """The final text: the full decode, unless a stop string cut it."""
        if not self.stopped:
            self.text = _decode(self.tokenizer, self.tokens)
        return self.text

    def take(self, final: bool = False) -> str:
        """Text not yet streamed, short of a tail that could still become a stop string (unless `final`)."""
        end = len(self.text)
        if not final and not self.stopped:
            hold = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
            end -= hold
        chunk = self.text[self.emitted:max(end, self.emitted)]
        self.emitted += len(chunk)
        return chunk


# ---------------------------------------------------------------------------------------------- API
Prompt = str | Sequence[int] | torch.Tensor


def _token_prompts(prompts: Prompt | Sequence[Prompt], tokenizer: Any, eos_token_id: int
                   ) -> tuple[list[list[int]], Any]:
    """Normalize to a list of token-id lists; loads OLMo's tokenizer of a model with EOS id `eos_token_id` (dolma2
    for OLMo 2/3) if strings come without one."""
    if isinstance(prompts, torch.Tensor) and prompts.dim() == 2:
        prompts = list(prompts)
    if isinstance(prompts, (str, torch.Tensor)) or (
            isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts)):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings or of token-id lists")
    if tokenizer is None and any(isinstance(p, str) for p in prompts):
        from .tokenizer import load_tokenizer, olmo_tokenizer_name

        tokenizer = load_tokenizer(name=olmo_tokenizer_name(eos_token_id))
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            out.append(_encode(tokenizer, prompt))
        elif isinstance(prompt, torch.Tensor) and prompt.dim() == 1:
            out.append([int(t) for t in prompt.tolist()])
        elif isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
            out.append(list(prompt))
        else:
            raise TypeError(f"prompt {i} must be a string or a list / 1-D tensor of token ids, got {type(prompt)}")
    return out, tokenizer


def _eos_ids(eos_token_id: Any, config: Any) -> set[int]:
    if eos_token_id is _FROM_CONFIG:
        eos_token_id = config.eos_token_id
    if eos_token_id is None:
        return set()
    return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(t) for t in eos_token_id}


def _check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 or None = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")


def generate(model: torch.nn.Module, prompts: Prompt | Sequence[Prompt], *, tokenizer: Any = None,
             max_new_tokens: int = 128, temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0,
             seed: int | None = None, stop: str | Iterable[str] = (),
             eos_token_id: int | Iterable[int] | None = _FROM_CONFIG,
             stream: Callable[[int, int, str], None] | None = None, truncate: bool = False,
             empty_prompt_token: int | None = None, cuda_graph: bool | None = None) -> list[Completion]:
    """Continue each prompt (a string, encoded with `tokenizer`, by default OLMo's; or token ids: a list, a 1-D
    tensor, or the rows of a 2-D tensor). Returns one `Completion` per prompt.

    Greedy when `temperature == 0` (the default), else sampled (`top_k`, `top_p`), reproducibly for a given
    `seed`. A sequence stops at an id of `eos_token_id` (default: the config's; None: never), at a `stop`
    string (needs a tokenizer), after `max_new_tokens`, or when prompt + new tokens fill the model's context
    (with a warning); the others go on. `stream(index, token, text)` is called for each new token with the
    text it completes ("" if none yet, or without a tokenizer).

    Prompts longer than the context raise ValueError, unless `truncate`, which keeps the last
    `max(1, context - max_new_tokens)` tokens of any prompt longer than that. An empty prompt raises
    ValueError, unless `empty_prompt_token` is given (e.g. the EOS id, OLMo's document separator): it then
    starts the empty prompt. `cuda_graph`: capture the decode step as a CUDA graph (default: on CUDA).
    """
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    config = model.config
    ids, tokenizer = _token_prompts(prompts, tokenizer, config.eos_token_id)
    stop = [stop] if isinstance(stop, str) else list(stop)
    if any(not s for s in stop):
        raise ValueError("stop strings must be non-empty")
    if stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer")
    context = config.max_sequence_length
    for i, prompt in enumerate(ids):
        if not prompt:
            if empty_prompt_token is None:
                raise ValueError(f"prompt {i} is empty; pass empty_prompt_token (e.g. the EOS id "
                                 f"{config.eos_token_id}) to start it from that token")
            prompt.append(empty_prompt_token)
        keep = max(1, context - max_new_tokens)
        if truncate and len(prompt) > keep:
            del prompt[:-keep]
        if len(prompt) > context:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens, more than the model's context of {context} "
                             f"(truncate=True keeps the last {keep})")
    B, longest = len(ids), max(len(p) for p in ids)
    batch = torch.full((B, longest), config.pad_token_id, dtype=torch.long)
    for b, prompt in enumerate(ids):
        batch[b, :len(prompt)] = torch.tensor(prompt)
    model.check_inputs(batch)

    budgets = [0 if max_new_tokens == 0 else min(max_new_tokens, context - len(p)) for p in ids]
    texts = [_TextState(tokenizer, stop) if tokenizer is not None else None for _ in ids]
    progress = _Progress(budgets, max_new_tokens, context, texts, _eos_ids(eos_token_id, config), stream)
    if not progress.done():
        lengths = torch.tensor([len(p) for p in ids], dtype=torch.int32)
        _decode_loop(model, batch, lengths, progress, seed, cuda_graph,
                     dict(temperature=temperature, top_k=top_k, top_p=top_p, vocab_size=config.vocab_size))
    return [Completion(tokens, None if state is None else state.finish(), reason)
            for tokens, state, reason in zip(progress.new, texts, progress.reasons)]


class _Progress:
    """Per-sequence bookkeeping: new tokens, text, finish reasons, streaming."""

    def __init__(self, budgets: list[int], max_new_tokens: int, context: int, texts: list, eos: set[int],
                 stream: Callable[[int, int, str], None] | None) -> None:
        self.budgets, self.max_new_tokens, self.context = budgets, max_new_tokens, context
        self.texts, self.eos, self.stream = texts, eos, stream
        self.new: list[list[int]] = [[] for _ in budgets]
        self.reasons: list[str | None] = [None] * len(budgets)
        for b, budget in enumerate(budgets):
            if budget == 0:
                self.reasons[b] = "length" if max_new_tokens == 0 else "context"
                if max_new_tokens:
                    warnings.warn(f"prompt {b} fills the model's context ({context} tokens): nothing to generate",
                                  stacklevel=2)

    def done(self) -> bool:
        return all(self.reasons)

    def running(self) -> list[bool]:
        return [r is None for r in self.reasons]

    def next_token_ends_all(self) -> bool:
        """Whether every running sequence reaches its token budget with its next token."""
        return all(r is not None or len(t) + 1 == n for r, t, n in zip(self.reasons, self.new, self.budgets))

    def accept(self, tokens: list[int]) -> bool:
        """Append each running sequence's token; returns whether any sequence finished."""
        finished = False
        for b, token in enumerate(tokens):
            if self.reasons[b] is not None:
                continue
            self.new[b].append(token)
            state = self.texts[b]
            if state is not None:
                state.push(token)
            if token in self.eos:
                self.reasons[b] = "eos"
            elif state is not None and state.stopped:
                self.reasons[b] = "stop"
            elif len(self.new[b]) == self.budgets[b]:
                self.reasons[b] = "length" if self.budgets[b] == self.max_new_tokens else "context"
                if self.reasons[b] == "context":
                    warnings.warn(f"sequence {b} filled the model's context ({self.context} tokens) "
                                  f"after {len(self.new[b])} new tokens", stacklevel=2)
            done = self.reasons[b] is not None
            if self.stream is not None:
                if done and state is not None:
                    state.finish()
                self.stream(b, token, "" if state is None else state.take(final=done))
            finished |= done
        return finished


class _HostCopy:
    """Each step's sampled tokens, copied to the host without stalling the device queue (CUDA: into pinned
    memory, with an event to wait on), so that the next step can be queued before the host reads them."""

    def __init__(self, device: torch.device, n: int) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.buffer = torch.empty(n, dtype=torch.long, pin_memory=True)
            self.event = torch.cuda.Event()
        self.values: list[int] = []

    def start(self, tokens: torch.Tensor) -> None:
        if self.cuda:
            self.buffer.copy_(tokens, non_blocking=True)
            self.event.record()
        else:
            self.values = tokens.tolist()

    def wait(self) -> list[int]:
        if self.cuda:
            self.event.synchronize()
            self.values = self.buffer.tolist()
        return self.values


def _decode_loop(model, batch: torch.Tensor, lengths: torch.Tensor, progress: _Progress, seed: int | None,
                 cuda_graph: bool | None, sampling: dict) -> None:
    """Prefill the right-padded `batch` (prompt b holds `lengths[b]` tokens), then decode until `progress`
    says every sequence is done.

    Each step is queued before the host has read the previous step's tokens, so the host's bookkeeping
    (stop checks, detokenizing, streaming) overlaps the device's work. A sequence finished by those tokens
    therefore takes one more (ignored) step that still advances it; the cache has a slot for it: it holds
    one slot beyond the last token any sequence can feed, and done sequences only rewrite slot `lengths[b]`.
    """
    B, longest = batch.shape
    device = model.head_weight.device
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    decoder = Decoder(model, B, min(progress.context, longest + progress.max_new_tokens) + 1, cuda_graph)
    host = _HostCopy(device, B)
    with torch.inference_mode():
        logits = decoder.prefill(batch.to(device), lengths)
        active = torch.tensor(progress.running(), dtype=torch.int32, device=device)
        while True:
            tokens = sample(logits, generator=generator, **sampling)
            host.start(tokens)
            if not progress.next_token_ends_all():
                logits = decoder.step(tokens, active)
            if progress.accept(host.wait()):
                if progress.done():
                    return
                active = torch.tensor(progress.running(), dtype=torch.int32, device=device)
