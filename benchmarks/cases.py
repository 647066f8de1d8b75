"""Benchmark cases: the ops, their inputs, and the shape sets (OLMo presets, a size sweep, tiny CPU shapes).

Every op's canonical inputs are the arguments of `olmo_fast.ops.<op>`; providers that want another layout
convert them outside the timed region (see `providers.py`). OLMo-7B targets (the `olmo-7b` preset and issues
3-4): 16k tokens x 4096 for LayerNorm, RoPE as `[B, T, 32, 128]` (OLMo 2 7B's QK-norm prologue alike), x 11008
for SwiGLU; attention with B*T = 16k
tokens, 32 heads of 128, causal, T 512..8192 (and OLMo 1.7's clip 8 at T 4096); decoding at batch 1 and 16
over a 4096-token cache; the fused linear cross-entropy over OLMo's 50304-token vocabulary (4096 tokens).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

OPS = ("swiglu", "layer_norm", "rope", "qkv_rope", "qk_norm_rope", "attention", "decode_attention",
       "linear_cross_entropy")
SHAPE_SETS = ("olmo-7b", "olmo-1b", "quick", "sweep", "cpu-small")
VOCAB = 50304  # OLMo's (padded) vocabulary
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Case:
    op: str
    params: dict = field(hash=False)
    size: int  # the x axis of the sweep plots: tokens (memory-bound ops, cross-entropy), T (attention), cache length

    @property
    def variant(self) -> str:
        """What sets this case apart from others of its op at the same size ('+res', 'clip8'): one plot line each."""
        p = self.params
        return " ".join(filter(None, ("+res" if p.get("residual") else "",
                                      f"clip{p['clip']:g}" if p.get("clip") is not None else "")))

    @property
    def label(self) -> str:
        p = self.params
        if self.op == "layer_norm":
            text = f"{p['n']}x{p['c']}" + (" +res" if p["residual"] else "")
        elif self.op == "swiglu":
            text = f"{p['n']}x{2 * p['h']}->{p['h']}"
        elif self.op == "linear_cross_entropy":
            text = f"{p['n']}x{p['d']} V{p['v']}"
        elif self.op in ("rope", "qkv_rope", "qk_norm_rope", "attention"):
            heads = f"{p['hq']}" if p["hq"] == p["hk"] else f"{p['hq']}/{p['hk']}"
            text = f"B{p['b']} T{p['t']} H{heads} D{p['d']}"
        else:
            text = f"B{p['b']} q{p['tq']} cache{p['cached']}/{p['slots']} H{p['hq']} D{p['d']}"
        if p.get("clip") is not None:
            text += f" clip{p['clip']:g}"
        return text


def modes(op: str) -> tuple[str, ...]:
    if op == "decode_attention":
        return ("fwd",)
    if op == "linear_cross_entropy":  # its gradients are computed in the forward: no backward of its own to time
        return ("fwd", "fwd+bwd")
    return ("fwd", "bwd", "fwd+bwd")


def differentiable(op: str, params: dict) -> tuple[int, ...]:
    """Indices of the canonical inputs a backward differentiates."""
    if op == "layer_norm":
        return (0, 1) if params["residual"] else (0,)
    return {"swiglu": (0,), "rope": (0, 1), "qkv_rope": (0,), "qk_norm_rope": (0, 1, 2), "attention": (0, 1, 2),
            "decode_attention": (), "linear_cross_entropy": (0, 1)}[op]


def make_inputs(op: str, p: dict, dtype: torch.dtype, device: torch.device) -> tuple:
    """Fresh random canonical inputs. qkv/q/k/v are scaled so that a clip of 8 (OLMo 1.7) does bite."""
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype)

    if op == "layer_norm":
        x = rand(p["n"], p["c"])
        return (x, rand(p["n"], p["c"])) if p["residual"] else (x,)
    if op == "swiglu":
        return (rand(p["n"], 2 * p["h"]),)
    if op == "rope":
        return rand(p["b"], p["t"], p["hq"], p["d"]), rand(p["b"], p["t"], p["hk"], p["d"])
    if op == "qkv_rope":
        return (rand(p["b"], p["t"], (p["hq"] + 2 * p["hk"]) * p["d"], scale=4.0),)
    if op == "qk_norm_rope":  # the projection output and the q_norm / k_norm weights (near 1, as trained ones)
        return (rand(p["b"], p["t"], (p["hq"] + 2 * p["hk"]) * p["d"]), 1 + rand(p["hq"] * p["d"], scale=0.1),
                1 + rand(p["hk"] * p["d"], scale=0.1))
    if op == "attention":
        scale = 4.0 if p.get("clip") is not None else 1.0
        return tuple(rand(p["b"], p["t"], h, p["d"], scale=scale) for h in (p["hq"], p["hk"], p["hk"]))
    if op == "decode_attention":
        seqlens = torch.full((p["b"],), p["cached"], dtype=torch.int32, device=device)
        return (rand(p["b"], p["tq"], p["hq"], p["d"]), rand(p["b"], p["slots"], p["hk"], p["d"]),
                rand(p["b"], p["slots"], p["hk"], p["d"]), seqlens)
    if op == "linear_cross_entropy":  # x, weight (logits of about unit scale), labels with every 5th ignored
        labels = torch.randint(0, p["v"], (p["n"],), device=device)
        labels[::5] = -100
        return rand(p["n"], p["d"]), rand(p["v"], p["d"], scale=p["d"] ** -0.5), labels
    raise ValueError(f"unknown op {op!r}; choose from {OPS}")


def _ln(n, c, residual):
    return Case("layer_norm", {"n": n, "c": c, "residual": residual}, n)


def _swiglu(n, h):
    return Case("swiglu", {"n": n, "h": h}, n)


def _lce(n, d, v):
    return Case("linear_cross_entropy", {"n": n, "d": d, "v": v}, n)


def _heads(op, b, t, h, d, clip=None, hk=None, size=None):
    params = {"b": b, "t": t, "hq": h, "hk": hk or h, "d": d}
    if op == "attention":
        params["causal"] = True
    if op in ("attention", "qkv_rope"):
        params["clip"] = clip
    return Case(op, params, size if size is not None else (t if op == "attention" else b * t))


def _decode(b, cached, h, d, slots=None, tq=1, hk=None):
    return Case("decode_attention", {"b": b, "tq": tq, "cached": cached, "slots": slots or cached, "hq": h,
                                     "hk": hk or h, "d": d}, cached)


def _model_set(d_model: int, heads: int, hidden: int, tokens: int, seq_lens: tuple[int, ...], clip_t: int,
               cache: int) -> list[Case]:
    hd = d_model // heads
    b = tokens // clip_t
    cases = [_swiglu(tokens, hidden), _ln(tokens, d_model, False), _ln(tokens, d_model, True),
             _heads("rope", b, clip_t, heads, hd), _heads("qkv_rope", b, clip_t, heads, hd),
             _heads("qkv_rope", b, clip_t, heads, hd, clip=8.0), _heads("qk_norm_rope", b, clip_t, heads, hd)]
    cases += [_heads("attention", tokens // t, t, heads, hd) for t in seq_lens]
    cases += [_heads("attention", b, clip_t, heads, hd, clip=8.0)]
    cases += [_decode(batch, cache, heads, hd) for batch in (1, 16)]
    return cases + [_lce(4096, d_model, VOCAB)]


def shape_set(name: str) -> list[Case]:
    if name == "olmo-7b":
        return _model_set(4096, 32, 11008, 16384, (512, 1024, 2048, 4096, 8192), 4096, 4096)
    if name == "quick":  # olmo-7b's, with attention at two lengths only: for the one-call GPU check
        return _model_set(4096, 32, 11008, 16384, (1024, 4096), 4096, 4096)
    if name == "olmo-1b":
        return _model_set(2048, 16, 8192, 16384, (1024, 2048, 4096), 2048, 2048)
    if name == "sweep":
        tokens = (1024, 4096, 16384, 65536)
        cases = [_swiglu(n, 11008) for n in tokens] + [_ln(n, 4096, True) for n in tokens]
        cases += [_heads(op, 1, n, 32, 128) for op in ("rope", "qkv_rope", "qk_norm_rope") for n in tokens]
        cases += [_heads("attention", 16384 // t, t, 32, 128) for t in (512, 1024, 2048, 4096, 8192, 16384)]
        cases += [_decode(1, s, 32, 128) for s in (512, 2048, 8192, 32768)]
        return cases + [_lce(n, 4096, VOCAB) for n in (1024, 4096, 16384)]
    if name == "cpu-small":  # odd sizes (not multiples of any block), GQA, a clip that bites: cheap on 2 cores;
        # then three model-like shapes (a 1024-wide block, 8 heads of 64 at T 256) where the kernels' work, not
        # the calls' fixed costs, is what is timed
        return [_swiglu(67, 96), _ln(67, 129, False), _ln(67, 129, True),
                _heads("rope", 2, 17, 3, 16), _heads("qkv_rope", 2, 17, 4, 16, clip=2.0),
                _heads("qk_norm_rope", 2, 17, 3, 16, hk=1),
                _heads("attention", 1, 33, 4, 16, hk=2), _heads("attention", 1, 33, 2, 16, clip=2.0),
                _decode(2, 37, 4, 16, slots=40, hk=2), _lce(67, 48, 515),
                _swiglu(512, 1024), _ln(512, 1024, True), _heads("attention", 1, 256, 8, 64, hk=4)]
    raise ValueError(f"unknown shape set {name!r}; choose from {SHAPE_SETS}")
