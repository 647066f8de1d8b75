"""Decode throughput of an `olmo_fast.OLMo` on the generator's `Decoder` (static KV cache, CUDA-graph step), and
the memory bandwidth it implies: `benchmark_decode` (used by `decode_throughput.py`; before, in
`olmo_fast.generation` and the package root).
"""
from __future__ import annotations

import time

import torch

from olmo_fast.generation import Decoder


def weight_bytes_per_step(model: torch.nn.Module, batch_size: int) -> int:
    """Bytes of weights one decode step reads: every block matrix and the head once, plus `batch_size` rows
    of the embedding (the whole table is read only as a tied head)."""
    cfg = model.config
    blocks = sum(p.numel() * p.element_size() for p in model.transformer["blocks"].parameters())
    head = model.head_weight
    rows = 0 if cfg.weight_tying else batch_size * cfg.d_model * head.element_size()
    return blocks + head.numel() * head.element_size() + rows


def benchmark_decode(model: torch.nn.Module, batch_size: int, prompt_len: int, new_tokens: int, *,
                     cuda_graph: bool | None = None, warmup: int = 3) -> dict:
    """Time a prefill of `batch_size` random prompts of `prompt_len` tokens (after an untimed one), then
    `new_tokens` greedy decode steps (after `warmup` untimed steps, which also capture the CUDA graph). The
    loop feeds each step's argmax back on the device, without host syncs. `achieved_gb_s` counts the weights
    and the KV cache read per step."""
    cfg = model.config
    if prompt_len < 1 or new_tokens < 1 or prompt_len + new_tokens > cfg.max_sequence_length:
        raise ValueError(f"need prompt_len >= 1, new_tokens >= 1 and prompt_len + new_tokens <= "
                         f"{cfg.max_sequence_length}; got {prompt_len} and {new_tokens}")
    device = model.head_weight.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    decoder = Decoder(model, batch_size, prompt_len + new_tokens, cuda_graph)
    ids = torch.randint(0, cfg.vocab_size, (batch_size, prompt_len), device=device)
    lengths = torch.full((batch_size,), prompt_len, dtype=torch.int32)
    with torch.inference_mode():
        decoder.prefill(ids, lengths)  # warm-up: first-call compilation is not prefill time
        decoder.cache.reset()
        sync()
        start = time.perf_counter()
        tokens = decoder.prefill(ids, lengths).argmax(-1)
        sync()
        prefill_s = time.perf_counter() - start
        idle = torch.zeros(batch_size, dtype=torch.int32, device=device)
        for _ in range(warmup):  # non-advancing steps: compile, autotune, capture
            decoder.step(tokens, idle)
        ones = torch.ones_like(idle)
        sync()
        start = time.perf_counter()
        for _ in range(new_tokens):
            tokens = decoder.step(tokens, ones).argmax(-1)
        sync()
        decode_s = time.perf_counter() - start
    weights = weight_bytes_per_step(model, batch_size)
    kv_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * model.head_weight.element_size()
    kv = batch_size * kv_token * (prompt_len + (new_tokens + 1) / 2)  # mean keys read per step
    step_s = decode_s / new_tokens
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(model.head_weight.dtype).removeprefix("torch."),
        "batch_size": batch_size, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "cuda_graph": decoder.use_graph,
        "prefill_ms": prefill_s * 1e3,
        "ms_per_token": step_s * 1e3,  # one decode step: each sequence gets one token
        "tokens_per_s": batch_size * new_tokens / decode_s,
        "weight_bytes_per_step": weights,
        "kv_bytes_per_step": kv,
        "achieved_gb_s": (weights + kv) / step_s / 1e9,
    }
