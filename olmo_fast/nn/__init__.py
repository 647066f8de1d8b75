"""Building blocks usable in any PyTorch model, each on one functional op of `olmo_fast.ops` (so every backend
runs them) and each holding its backend (`OpModule`; `set_backend` walks a model's modules): norms, SwiGLU,
rotary embedding and OLMo's fused qkv + RoPE prologue, attention (also over a KV cache), and the causal LM loss.
`olmo_fast.OLMo` is built from them; `olmo_fast.patch` puts the same ops into transformers' models
(`olmo_fast/patch/forwards.py` holds those replacement forwards)."""
from .attention import Attention
from .base import OpModule, set_backend
from .loss import CausalLMLoss, LinearCrossEntropy, causal_lm_loss, next_token_labels
from .mlp import SwiGLU, SwiGLUMLP
from .norms import LayerNorm, RMSNorm
from .rotary import QKVRope, RotaryEmbedding, apply_rope

__all__ = ["OpModule", "set_backend", "LayerNorm", "RMSNorm", "SwiGLU", "SwiGLUMLP", "RotaryEmbedding", "apply_rope",
           "QKVRope", "Attention", "CausalLMLoss", "LinearCrossEntropy", "causal_lm_loss", "next_token_labels"]
