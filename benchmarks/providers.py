"""Who computes each op: ours (Triton, the compiled extension), PyTorch eager, `torch.compile` of the same eager
code, and the libraries a user would pick instead (Liger-Kernel, PyTorch SDPA's backends, flash-attn, apex).

A provider's `build(case)` returns an `Impl` or raises `Unavailable` (with the reason: "not installed",
"CUDA only", ...). Third-party kernels get their own preferred layout, converted outside the timed region
(`Impl.prepare`), and their output and input gradients are turned back into ours (`Impl.post`,
`Impl.grad_post`) only for the correctness check.
Where a library computes a nearby function (Liger's affine LayerNorm), the note says what differs.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from olmo_fast import ops

from . import report
from .cases import Case

THETA, EPS = 10000.0, 1e-5


class Unavailable(Exception):
    """This provider cannot run this case; str() says why."""


class NotInstalled(Unavailable):
    """The library behind this provider is not installed."""


@dataclass
class Impl:
    fn: Callable[..., Any]
    prepare: Callable[..., tuple] | None = None  # canonical inputs -> fn's arguments (untimed)
    grad_idx: tuple[int, ...] | None = None  # which of fn's arguments the backward differentiates (None: the op's)
    post: Callable[[Any], Any] | None = None  # fn's output -> canonical output (for the check only)
    grad_post: Callable[[list], list] | None = None  # gradients of fn's grad_idx args -> of the op's inputs
    note: str = ""


@dataclass
class Provider:
    name: str
    build: Callable[[Case, torch.device], Impl]


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise NotInstalled(f"no module {module!r}")


def _cuda_only(device: torch.device) -> None:
    if device.type != "cuda":
        raise Unavailable("CUDA only")


def clamp(t: torch.Tensor, clip: float | None) -> torch.Tensor:
    return t if clip is None else t.clamp(-clip, clip)


# ---------------------------------------------------------------- our public ops, one adapter per op
def op_fn(case: Case, backend: str, variant: str | None = None) -> Callable[..., Any]:
    """`olmo_fast.ops.<op>` on the canonical inputs with this case's parameters and `backend` (and attention's
    kernel `variant`: None for the op's default)."""
    p = case.params
    if case.op == "layer_norm":
        return lambda x, residual=None: ops.layer_norm(x, eps=EPS, residual=residual, backend=backend)
    if case.op == "swiglu":
        return lambda h: ops.swiglu(h, backend=backend)
    if case.op == "rope":
        return lambda q, k: ops.rope(q, k, theta=THETA, backend=backend)
    if case.op == "qkv_rope":
        return lambda qkv: ops.qkv_rope(qkv, n_heads=p["hq"], n_kv_heads=p["hk"], clip=p["clip"], theta=THETA,
                                        backend=backend)
    if case.op == "qk_norm_rope":
        return lambda qkv, wq, wk: ops.qk_norm_rope(qkv, wq, wk, n_heads=p["hq"], n_kv_heads=p["hk"], theta=THETA,
                                                    backend=backend)
    if case.op == "attention":
        return lambda q, k, v: ops.attention(q, k, v, causal=p["causal"], clip=p["clip"], backend=backend,
                                             variant=variant)
    if case.op == "decode_attention":
        return lambda q, kc, vc, seqlens: ops.decode_attention(q, kc, vc, seqlens, backend=backend)
    if case.op == "linear_cross_entropy":
        return lambda x, w, labels: ops.linear_cross_entropy(x, w, labels, backend=backend)
    raise ValueError(case.op)


def _ours(backend: str, variant: str | None = None) -> Callable[[Case, torch.device], Impl]:
    def build(case: Case, device: torch.device) -> Impl:  # BackendError (no kernel) surfaces at the first call
        notes = [report.INTERPRETED] if backend == "triton" and device.type == "cpu" else []
        if case.op == "attention" and backend == "triton":
            notes.append(f"variant {ops.softmax_attention.attention_variant(variant)}")
        return Impl(op_fn(case, backend, variant), note="; ".join(notes))
    return build


def attention_variants() -> list[Provider]:
    """`ours-triton[<variant>]` for each Triton attention variant other than the default (which `ours-triton`
    runs, or $OLMO_FAST_ATTENTION's): the A/B rows of `olmo-fast bench --ops attention`."""
    attn = ops.softmax_attention
    return [Provider(f"ours-triton[{v}]", _ours("triton", v)) for v in attn.ATTENTION_VARIANTS
            if v != attn.DEFAULT_VARIANT]


def decode_split_variants() -> list[Provider]:
    """`ours-triton[splits=<k>/SM]`: the Triton decode kernel aiming at k split programs per SM instead of its
    default (`kernels/decode_attention.py`'s PROGRAMS_PER_SM): the A/B rows of `olmo-fast bench --ops
    decode_attention` (batch 1 and 16 on OLMo-7B's shapes in the quick and olmo-7b sets)."""
    from olmo_fast.kernels import decode_attention as decode

    def build(per_sm: int) -> Callable[[Case, torch.device], Impl]:
        def impl(case: Case, device: torch.device) -> Impl:
            fn = ops.dispatch.kernel("decode_attention", "triton", device.type)
            notes = [report.INTERPRETED] if device.type == "cpu" else []
            return Impl(lambda q, kc, vc, seqlens: fn(q, kc, vc, seqlens, programs_per_sm=per_sm),
                        note="; ".join(notes + [f"{per_sm} split programs per SM"]))
        return impl
    return [Provider(f"ours-triton[splits={k}/SM]", build(k)) for k in decode.PROGRAMS_PER_SM_VARIANTS]


def _eager(case: Case, device: torch.device) -> Impl:
    return Impl(op_fn(case, "torch"), note="olmo_fast.ops.reference")


def _compiled(case: Case, device: torch.device) -> Impl:
    # The bwd timing replays one graph (retain_graph=True), which a compiled backward that donates its saved
    # buffers refuses: keep them (a process-wide switch, read when a function compiles).
    import torch._functorch.config

    if hasattr(torch._functorch.config, "donated_buffer"):
        torch._functorch.config.donated_buffer = False
    return Impl(torch.compile(op_fn(case, "torch"), dynamic=False), note="torch.compile of the eager code")


# ---------------------------------------------------------------- third parties
def _norm(case: Case, norm: Callable[[torch.Tensor], torch.Tensor], note: str) -> Impl:
    """A LayerNorm without a fused residual: `ops.layer_norm`'s contract with the residual add as its own op."""
    def fn(x, residual=None):
        h = x if residual is None else x + residual
        y = norm(h)
        return y if residual is None else (y, h)
    return Impl(fn, note=note + ("; residual add as its own op" if case.params["residual"] else ""))


def _torch_layer_norm(case: Case, device: torch.device) -> Impl:
    return _norm(case, lambda h: F.layer_norm(h, h.shape[-1:], eps=EPS), "F.layer_norm on the input dtype")


def _liger_layer_norm(case: Case, device: torch.device) -> Impl:
    _require("liger_kernel")
    _cuda_only(device)
    from liger_kernel.transformers.functional import liger_layer_norm

    affine: dict = {}  # (dtype, width) -> (weight 1, bias 0), made once, outside the timed calls

    def norm(h):
        key = (h.dtype, h.shape[-1])
        if key not in affine:
            ones = torch.ones(h.shape[-1], dtype=h.dtype, device=h.device)
            affine[key] = ones, torch.zeros_like(ones)
        return liger_layer_norm(h, *affine[key], EPS)

    return _norm(case, norm, "affine LayerNorm with weight=1, bias=0 (Liger has no non-parametric one): it also "
                             "reads weight and bias and its backward computes their gradients")


def _apex_layer_norm(case: Case, device: torch.device) -> Impl:
    _require("apex")
    _cuda_only(device)
    from apex.normalization import FusedLayerNorm

    module = FusedLayerNorm(case.params["c"], eps=EPS, elementwise_affine=False)
    return _norm(case, module, "apex FusedLayerNorm(elementwise_affine=False)")


def _torch_cross_entropy(case: Case, device: torch.device) -> Impl:
    return Impl(lambda x, w, labels: F.cross_entropy((x @ w.t()).float(), labels),
                note="F.cross_entropy of the whole [tokens, vocab] logits (x's dtype, the loss in fp32)")


def _liger_swiglu(case: Case, device: torch.device) -> Impl:
    _require("liger_kernel")
    _cuda_only(device)
    from liger_kernel.transformers.functional import liger_swiglu

    def prepare(h):
        x, gate = h.chunk(2, dim=-1)
        return gate.contiguous(), x.contiguous()

    return Impl(lambda gate, x: liger_swiglu(gate, x), prepare, (0, 1),
                grad_post=lambda grads: [torch.cat((grads[1], grads[0]), dim=-1)],  # [dx | dgate]
                note="silu(gate) * up on separate contiguous gate/up tensors: its kernel assumes contiguous "
                     "rows, so it cannot read OLMo's fused [x | gate] in place")


def _untranspose(grads: list) -> list:
    return [g.transpose(1, 2) for g in grads]


def _rope_table(t: int, d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / THETA ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
    angles = torch.arange(t, device=device, dtype=torch.float32)[:, None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)[None]  # [1, T, D]
    return angles.cos(), angles.sin()


def _liger_rope(case: Case, device: torch.device) -> Impl:
    _require("liger_kernel")
    _cuda_only(device)
    from liger_kernel.transformers.functional import liger_rope

    def prepare(q, k):
        cos, sin = _rope_table(q.shape[1], q.shape[-1], q.device)
        return q.transpose(1, 2), k.transpose(1, 2), cos, sin  # HF's [B, H, T, D] view of [B, T, H, D] memory

    return Impl(lambda q, k, cos, sin: liger_rope(q, k, cos, sin), prepare, (0, 1),
                post=lambda out: (out[0].transpose(1, 2), out[1].transpose(1, 2)), grad_post=_untranspose,
                note="HF-style fp32 cos/sin table built outside the timing; rotates q and k in place")


def _sdpa(backend_name: str) -> Callable[[Case, torch.device], Impl]:
    def build(case: Case, device: torch.device) -> Impl:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        if backend_name != "flash":
            _cuda_only(device)  # SDPA's memory-efficient and cuDNN kernels are CUDA kernels
        backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                   "cudnn": SDPBackend.CUDNN_ATTENTION}[backend_name]
        p = case.params
        if case.op == "attention":
            clip = p["clip"]

            def fn(q, k, v):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(clamp(q, clip), clamp(k, clip), clamp(v, clip),
                                                          is_causal=p["causal"], enable_gqa=q.shape[1] != k.shape[1])

            def prepare(q, k, v):  # SDPA's native layout [B, H, T, D], contiguous
                return tuple(t.transpose(1, 2).contiguous() for t in (q, k, v))

            note = "native [B, H, T, D] layout" + ("; clamp of q, k, v as separate ops" if clip is not None else "")
            return Impl(fn, prepare, (0, 1, 2), post=lambda out: out.transpose(1, 2), grad_post=_untranspose,
                        note=note)

        def fn(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1])

        def prepare(q, kc, vc, seqlens):  # a [B, H, S, D] cache (gpt-fast's), read up to the common length
            n = int(seqlens[0])
            if not bool((seqlens == n).all()):
                raise Unavailable("needs one cache length for the whole batch (no mask)")
            return (q.transpose(1, 2).contiguous(),) + tuple(c.transpose(1, 2).contiguous()[:, :, :n] for c in (kc, vc))

        return Impl(fn, prepare, (), post=lambda out: out.transpose(1, 2),
                    note="[B, H, S, D] cache sliced to the valid length, no mask")
    return build


def _flash_attn(case: Case, device: torch.device) -> Impl:
    _require("flash_attn")
    _cuda_only(device)
    p = case.params
    if case.op == "attention":
        from flash_attn import flash_attn_func

        clip = p["clip"]
        return Impl(lambda q, k, v: flash_attn_func(clamp(q, clip), clamp(k, clip), clamp(v, clip), causal=p["causal"]),
                    note="clamp of q, k, v as separate ops" if clip is not None else "")
    from flash_attn import flash_attn_with_kvcache

    return Impl(lambda q, kc, vc, seqlens: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, causal=True),
                note="flash_attn_with_kvcache")


def registry() -> dict[str, list[Provider]]:
    """Per op, every provider considered (installed or not: the ones missing are reported as such)."""
    ours = [Provider("ours-triton", _ours("triton")), Provider("ours-cpp", _ours("cpp")),
            Provider("eager", _eager), Provider("torch-compile", _compiled)]
    sdpa = [Provider(f"sdpa-{name}", _sdpa(name)) for name in ("flash", "efficient", "cudnn")]
    flash_attn = [Provider("flash-attn", _flash_attn)]
    return {
        "swiglu": ours + [Provider("liger", _liger_swiglu)],
        "layer_norm": ours + [Provider("torch-native", _torch_layer_norm), Provider("liger", _liger_layer_norm),
                              Provider("apex", _apex_layer_norm)],
        "rope": ours + [Provider("liger", _liger_rope)],
        "qkv_rope": list(ours),
        "qk_norm_rope": list(ours),
        "attention": ours[:1] + attention_variants() + ours[1:] + sdpa + flash_attn,
        "decode_attention": ours[:1] + decode_split_variants() + ours[1:] + sdpa + flash_attn,
        "linear_cross_entropy": ours + [Provider("torch-native", _torch_cross_entropy)],
    }

