"""Building blocks usable in any PyTorch model, each on one functional op of `olmo_fast.ops` (so every backend
runs them) and each holding its backend (`OpModule`; `set_backend` walks a model's modules): norms (OLMo 2's
norm-then-add included), SwiGLU, rotary embedding, OLMo's fused qkv + RoPE prologue and OLMo 2's QK-norm + RoPE
prologue, attention (also over a KV cache, optionally windowed), and the causal LM loss.
`olmo_fast.OLMo` is built from them; `olmo_fast.patch` puts the same ops into transformers' models
(`olmo_fast/patch/forwards.py` holds those replacement forwards)."""
from .attention import Attention
from .base import OpModule, set_backend
from .loss import CausalLMLoss, LinearCrossEntropy, causal_lm_loss, next_token_labels
from .mlp import SwiGLU, SwiGLUMLP
from .norms import LayerNorm, RMSNorm, RMSNormAdd
from .qk_norm import QKNormRope
from .rotary import QKVRope, RotaryEmbedding, apply_rope

__all__ = ["OpModule", "set_backend", "LayerNorm", "RMSNorm", "RMSNormAdd", "SwiGLU", "SwiGLUMLP", "RotaryEmbedding",
           "apply_rope", "QKVRope", "QKNormRope", "Attention", "CausalLMLoss", "LinearCrossEntropy", "causal_lm_loss",
           "next_token_labels"]
