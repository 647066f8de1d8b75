"""Building blocks usable in any PyTorch model, each on one functional op of `olmo_fast.ops` (so every backend
runs them): norms, SwiGLU, rotary embedding, attention, and the fused linear + cross-entropy loss.
`olmo_fast.patch` puts the same ops into transformers' models (`olmo_fast/patch/forwards.py` holds those replacement
forwards)."""
from .attention import Attention
from .loss import LinearCrossEntropy
from .mlp import SwiGLU, SwiGLUMLP
from .norms import LayerNorm, RMSNorm
from .rotary import RotaryEmbedding, apply_rope

__all__ = ["LayerNorm", "RMSNorm", "SwiGLU", "SwiGLUMLP", "RotaryEmbedding", "apply_rope", "Attention",
           "LinearCrossEntropy"]
