"""Tiny random-weight transformers OLMo models shared by the parity and generation tests."""
from __future__ import annotations

import pytest
import torch


def require_transformers():
    """The transformers module; skips the calling test (only it) where transformers is not installed."""
    return pytest.importorskip("transformers", reason="comparing with HF needs transformers: pip install olmo-fast[hf]")


def hf_olmo(**overrides):
    """A 2-layer `OlmoForCausalLM` (vocab 96, d 64) with weights ~N(0, 0.2): HF's own init (std 0.02) gives
    near-uniform logits and activations too small for a clip_qkv to bite. Skips the test without transformers."""
    transformers = require_transformers()
    cfg = transformers.OlmoConfig(vocab_size=96, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                                  max_position_embeddings=48, rope_theta=10000.0, pad_token_id=1, eos_token_id=0,
                                  bos_token_id=None, attn_implementation="eager", **overrides)
    torch.manual_seed(1)
    model = transformers.OlmoForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model
