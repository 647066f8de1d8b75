"""Decoding attention of the "triton" (split-K flash-decoding) and "cpp" backends against float64 PyTorch
(`ops.reference.decode_attention`).

Rule (test_attention.py's): element by element, |kernel - f64| <= 2 * max |torch same dtype - f64|
+ SLACK * eps * scale, `scale` the element's terms summed in absolute value (`conftest.attention_error_scales`),
never NaN. Outputs are poisoned (NaN allocations); cache slots past each sequence's length hold NaN: the
kernel must never read them into the result.
fp16/fp32 on the CPU (Triton under TRITON_INTERPRET=1; cpp's CPU loops also in bf16); Triton's bf16 in the
`gpu`-marked test (the interpreter's bf16 tl.dot is wrong). `num_splits` is Triton's only.
"""
from __future__ import annotations

import pytest
import torch
from conftest import (
    DEVICE,
    attention_error_scales,
    dot_eps,
    poisoned_allocations,
    require_kernel,
    require_kernel_where_registered,
)

from olmo_fast import ops
from olmo_fast.ops import dispatch, reference

SLACK = 8.0  # as test_attention.py's
BACKENDS = ["triton", "cpp"]


def need(backend):
    require_kernel_where_registered("decode_attention", backend)


def make_inputs(B, Tq, H, Hkv, S, D, dtype):
    """q a non-contiguous slice; caches allocated head-major ([B, Hkv, S, D] transposed, as a paged/static cache
    may be); ragged seqlens in [Tq, S], the first = S and the last = Tq; NaN in every slot past a sequence's length."""
    q = torch.randn(B, Tq, H + 2, D, device=DEVICE)[:, :, 1:-1].to(dtype)
    k = torch.randn(B, Hkv, S, D, device=DEVICE).transpose(1, 2).to(dtype)
    v = torch.randn(B, Hkv, S, D, device=DEVICE).transpose(1, 2).to(dtype)
    seqlens = torch.randint(Tq, S + 1, (B,), device=DEVICE)
    seqlens[0] = S
    if B > 1:
        seqlens[-1] = Tq  # the cache holds only the new tokens: every split but the first is empty
    stale = torch.arange(S, device=DEVICE)[None, :] >= seqlens[:, None]
    k[stale], v[stale] = float("nan"), float("nan")
    return q, k, v, seqlens


def check(q, k, v, seqlens, backend="triton", num_splits=None, scale=None):
    kernel = dispatch.kernel("decode_attention", backend, q.device.type)
    splits = {"num_splits": num_splits} if backend == "triton" else {}
    with poisoned_allocations():
        got = kernel(q, k, v, seqlens, scale, **splits)
    # The references use a masked softmax, which still multiplies NaN slots by 0: give them clean caches.
    clean_k, clean_v = (torch.nan_to_num(t, nan=0.0) for t in (k, v))
    same = reference.decode_attention(q, clean_k, clean_v, seqlens, scale)
    ref = reference.decode_attention(q.double(), clean_k.double(), clean_v.double(), seqlens, scale)
    assert got.dtype == q.dtype and got.shape == q.shape and not got.isnan().any()
    Tq, S = q.shape[1], k.shape[1]
    visible = torch.arange(S, device=DEVICE) <= (seqlens[:, None, None] - Tq + torch.arange(Tq, device=DEVICE)[:, None])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    magnitude = attention_error_scales(q, clean_k, clean_v, torch.zeros_like(q), visible, scale)[0]
    err, base = (got.double() - ref).abs(), (same.double() - ref).abs().max().item()
    bound = 2 * base + SLACK * dot_eps(q.dtype) * magnitude
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (f"kernel error {err.flatten()[worst]:.3g} > 2 x torch {q.dtype} error {base:.3g} + "
                                  f"{SLACK} eps x scale {magnitude.flatten()[worst]:.3g}")


# (B, Tq, H, Hkv, S, D, num_splits): one token or a few (causal among them), GQA ratios 1/2/4, odd cache sizes,
# one split (the split kernel writes the output) and several (partials + combine), None = the default heuristic.
CASES = [
    (1, 1, 4, 4, 1, 64, None),
    (2, 1, 4, 4, 100, 64, None),
    (3, 1, 8, 2, 200, 128, 3),
    (2, 3, 4, 1, 150, 96, 2),
    (1, 5, 4, 2, 70, 64, 1),
    (2, 2, 4, 1, 257, 128, 8),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-Tq{}-H{}-Hkv{}-S{}-D{}-splits{}".format(*c))
def test_decode_attention_matches_f64(case, dtype, backend):
    need(backend)
    B, Tq, H, Hkv, S, D, splits = case
    check(*make_inputs(B, Tq, H, Hkv, S, D, dtype), backend=backend, num_splits=splits)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_rows_per_kv_head_and_scale(backend):
    """Group x Tq = 8 x 10 = 80 rows: more than one row block per kv head (Triton's 64, cpp's 16)."""
    need(backend)
    check(*make_inputs(1, 10, 8, 1, 90, 64, torch.float32), backend=backend, num_splits=2, scale=0.2)


def test_cpp_bf16_odd_sizes():
    """cpp's CPU loops in bf16 (no interpreter limit there): an odd head dim, a group of 2 x 2 new tokens, and
    131 slots (two full key blocks of 64 and a ragged one)."""
    need("cpp")
    check(*make_inputs(3, 2, 6, 3, 131, 40, torch.bfloat16), backend="cpp")


@pytest.mark.parametrize("shape", [(0, 1, 4, 2, 5, 16), (2, 0, 4, 2, 0, 16), (2, 1, 4, 2, 5, 0)], ids=str)
def test_cpp_empty_shapes(shape):
    """No batch, no new token over an empty cache, an empty head dim: an empty output of q's shape."""
    need("cpp")
    B, Tq, H, Hkv, S, D = shape
    q = torch.randn(B, Tq, H, D, device=DEVICE)
    k = torch.randn(B, S, Hkv, D, device=DEVICE)
    out = dispatch.kernel("decode_attention", "cpp", DEVICE)(q, k, k, torch.full((B,), S, device=DEVICE), None)
    assert out.shape == q.shape and out.dtype == q.dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_public_op_matches_cache_attention(backend):
    """`ops.decode_attention` equals full causal attention over each sequence's prefix."""
    need(backend)
    q, k, v, seqlens = make_inputs(2, 2, 4, 2, 40, 64, torch.float32)
    out = ops.decode_attention(q, k, v, seqlens, backend=backend)
    for b in range(2):
        n = int(seqlens[b])
        want = reference.attention(q[b:b + 1].double(), k[b:b + 1, :n].double(), v[b:b + 1, :n].double(), True)
        torch.testing.assert_close(out[b:b + 1].double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise(backend):
    need(backend)
    q = torch.randn(1, 1, 3, 64, device=DEVICE)
    k = torch.randn(1, 8, 2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="multiple"):
        ops.decode_attention(q, k, k, torch.tensor([4], device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match="seqlens"):
        ops.decode_attention(q, k, k, torch.tensor([4, 4], device=DEVICE), backend=backend)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 tl.dot needs a GPU (the interpreter's is wrong)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [(1, 1, 32, 32, 4096, 128, None), (4, 1, 32, 8, 1000, 128, None),
                                  (2, 4, 16, 2, 333, 64, 5), (64, 1, 32, 32, 512, 128, None)], ids=str)
def test_decode_attention_gpu(case, dtype):
    require_kernel("decode_attention", "triton")
    B, Tq, H, Hkv, S, D, splits = case
    check(*make_inputs(B, Tq, H, Hkv, S, D, dtype), num_splits=splits)


def test_split_policy_and_its_bench_rows():
    """The split count for OLMo-7B decode shapes on a 132-SM H100/H200 (32 kv heads, cache 4096): batch 1 gets
    about `per_sm` programs per SM, batch 16 is wide enough unsplit; `olmo-fast bench --ops decode_attention`
    has an A/B row per other policy, each computing the same attention."""
    from olmo_fast.benchmarks import providers
    from olmo_fast.benchmarks.cases import Case
    from olmo_fast.kernels import decode_attention as decode

    assert [decode.default_splits(32, 4096, 132, k) for k in (1, 2, 4, 8)] == [5, 9, 17, 32]
    assert decode.default_splits(16 * 32, 4096, 132, 2) == 1 and decode.default_splits(32, 4096, 0, 8) == 1
    assert decode.default_splits(1, 100, 132, 2) == 1  # never a chunk under CHUNK_ALIGN slots
    require_kernel("decode_attention", "triton")
    rows = [p for p in providers.registry()["decode_attention"] if p.name.startswith("ours-triton[")]
    assert [p.name for p in rows] == [f"ours-triton[splits={k}/SM]" for k in decode.PROGRAMS_PER_SM_VARIANTS]
    q, k, v, seqlens = make_inputs(2, 1, 4, 2, 37, 16, torch.float32)
    case = Case("decode_attention", {}, 37)
    want = ops.decode_attention(q, k, v, seqlens, backend="triton")
    for provider in rows:
        assert torch.equal(provider.build(case, q.device).fn(q, k, v, seqlens), want)
