"""Tokenized requests, built exactly as OLMo's `ICLMultiChoiceTaskDataset.prep_examples` builds them.

The continuation is tokenized on its own (with its leading space); the model reads context + continuation
minus its last token, cut from the left to the model's context length; the context is what precedes the
continuation in that cut sequence, so `len(context) + len(continuation) - 1 <= max_length`.
"""
from __future__ import annotations

from dataclasses import dataclass

from .tasks import Choice


@dataclass(frozen=True)
class Request:
    doc_id: int
    cont_id: int
    label: int
    context: tuple[int, ...]  # the (left-cut) context tokens, never empty
    continuation: tuple[int, ...]  # the scored tokens, never empty
    chars: int  # characters of the continuation without its leading space: len_norm's divisor


def tokenize_choices(choices: list[Choice], tokenizer, max_length: int) -> list[Request]:
    """`tokenizer` is a `tokenizers.Tokenizer` (or anything whose `encode(text, add_special_tokens=False)` has
    `.ids`); ValueError where a continuation is empty or does not fit the model's context."""
    cache: dict[str, tuple[int, ...]] = {}

    def encode(text: str) -> tuple[int, ...]:
        if text not in cache:
            cache[text] = tuple(tokenizer.encode(text, add_special_tokens=False).ids)
        return cache[text]

    out = []
    for c in choices:
        context, continuation = encode(c.context), encode(c.continuation)
        if not continuation:
            raise ValueError(f"doc {c.doc_id} choice {c.cont_id}: the continuation {c.continuation!r} has no tokens")
        query = (context + continuation[:-1])[-max_length:]
        context_len = len(query) - len(continuation) + 1
        if context_len < 1:
            raise ValueError(f"doc {c.doc_id} choice {c.cont_id}: a continuation of {len(continuation)} tokens does "
                             f"not fit the model's context ({max_length} tokens)")
        out.append(Request(c.doc_id, c.cont_id, c.label, query[:context_len], continuation, len(c.continuation) - 1))
    return out
