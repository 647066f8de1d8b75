"""Clipped-QKV flash attention (forward + backward) of the "triton" kernel variants and the "cpp" backend against
float64 PyTorch (`ops.reference` in float64).

Rule (flash-attention's, with a slack that scales): for out, dq, dk, dv, element by element,
|kernel - f64| <= 2 * max |torch same dtype - f64| + SLACK * eps * scale (eps: the dtype's, tf32's 2^-10 for fp32
on NVIDIA GPUs, where the kernels multiply in tf32), where "torch same dtype" is the
"torch" backend (clamp + SDPA) run in the kernel's dtype and `scale` is the element's terms summed in absolute value
(`conftest.attention_error_scales`, float64), so the bound holds on any CPU, also where an exact gradient is ~0.
Never NaN, fully masked rows exactly 0.
On the CPU (TRITON_INTERPRET=1) Triton runs fp16 and fp32 only: the interpreter's bf16 tl.dot is wrong; its bf16
is covered by the `gpu`-marked tests on a GPU (cpp's CPU loops run bf16 here too). Kernel outputs are poisoned
(NaN-filled allocations) so unwritten elements fail.
"""
from __future__ import annotations

import pytest
import torch
from conftest import (
    DEVICE,
    attention_error_scales,
    dot_eps,
    poisoned_allocations,
    require_kernel_where_registered,
)

from olmo_fast import ModelConfig, OLMo, ops
from olmo_fast.ops import reference

try:  # test_row_offsets_are_int64 runs a kernel of its own; every test here skips without the triton backend
    import triton
    import triton.language as tl

    from olmo_fast.kernels.attention import kv_range, q_range, row_offsets
except ImportError:
    triton = None

CLIP = 0.75  # exactly representable in fp16/bf16; inputs are N(0, 1): ~45% of values lie beyond it
# Epsilons of slack per unit of summed magnitude: kernel error / (eps * scale) reaches ~2.5 on the CPU cases (dv in
# fp32, where torch's own error is as large), under 1 in fp16 (P and dS rounded to fp16 before their products).
# A real defect (a lost term, a wrong mask) is an error of order 1 / eps in these units.
SLACK = 8.0


BACKENDS = ["triton", "cpp"]
VARIANTS = ops.softmax_attention.ATTENTION_VARIANTS
# Every kernel set: each Triton variant, and the cpp backend (one attention, whatever the variant).
IMPLEMENTATIONS = [("triton", variant) for variant in VARIANTS] + [("cpp", "fa2")]


def implementations(test):
    return pytest.mark.parametrize("backend,variant", IMPLEMENTATIONS, ids=lambda x: x)(test)


def need(backend):
    require_kernel_where_registered("attention_fwd", backend)
    require_kernel_where_registered("attention_bwd", backend)


def make_qkv(B, Tq, Tk, H, Hkv, D, dtype, clip):
    """Non-contiguous q/k/v (q a slice of a wider buffer, k/v allocated head-major), N(0, 1), with ~10% of the
    entries set exactly to +-clip (the clamp's gradient must pass there)."""
    q = torch.randn(B, Tq, H + 1, D, device=DEVICE)[:, :, 1:]
    k = torch.randn(B, Hkv, Tk, D, device=DEVICE).transpose(1, 2)
    v = torch.randn(B, Hkv, Tk, D, device=DEVICE).transpose(1, 2)
    out = []
    for t in (q, k, v):
        if clip is not None:
            at_edge = torch.rand(t.shape, device=DEVICE) < 0.1
            t = torch.where(at_edge, torch.sign(torch.randn_like(t)) * clip, t)
        out.append(t.to(dtype))
    return out


def run(q, k, v, dout, causal, clip, backend, scale=None, variant=None, window=None):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = ops.attention(q, k, v, causal=causal, clip=clip, scale=scale, window=window, backend=backend,
                        variant=variant)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    return (out, *grads)


def check_against_f64(q, k, v, causal, clip, scale=None, backend="triton", variant="fa2", window=None):
    """Forward and backward of the backend's kernels (triton: the kernel `variant`) vs float64, within 2x the
    same-dtype torch error."""
    dout = torch.randn(q.shape, device=DEVICE).to(q.dtype)
    with poisoned_allocations():
        got = run(q, k, v, dout, causal, clip, backend, scale, variant, window)
    same = run(q, k, v, dout, causal, clip, "torch", scale, window=window)
    ref = run(q.double(), k.double(), v.double(), dout.double(), causal, clip, "torch", scale, window=window)
    Tq, Tk = q.shape[1], k.shape[1]
    visible = torch.ones(1, Tq, Tk, dtype=torch.bool, device=DEVICE)
    if causal:
        visible = visible.tril(diagonal=Tk - Tq)
    if window is not None:
        visible = visible.triu(diagonal=Tk - Tq - window + 1)
    scales = attention_error_scales(q, k, v, dout, visible, q.shape[-1] ** -0.5 if scale is None else scale, clip)
    assert_within(got, same, ref, scales, ("out", "dq", "dk", "dv"))
    if clip is not None:  # the clamp's gradient is exactly zero beyond the clip
        for x, grad in zip((q, k, v), got[1:]):
            assert (grad[x.abs() > clip] == 0).all()
    return got


def assert_within(got, same, ref, scales, names):
    """The module's rule for each (kernel, torch same dtype, float64, error scale) quadruple."""
    for name, g, s, r, m in zip(names, got, same, ref, scales):
        assert g.dtype == s.dtype and g.shape == s.shape, name
        assert not g.isnan().any(), f"{name} has NaN"
        err, base = (g.double() - r).abs(), (s.double() - r).abs().max().item()
        slack = SLACK * dot_eps(g.dtype) * m
        worst = (err - 2 * base - slack).argmax()
        assert (err <= 2 * base + slack).all(), \
            (f"{name}: kernel error {err.flatten()[worst]:.3g} > 2 x torch {g.dtype} error {base:.3g} + "
             f"{SLACK} eps x scale {m.flatten()[worst]:.3g}")


# (B, Tq, Tk, H, Hkv, D, causal): T=1, odd lengths, Tq < Tk and Tq > Tk (rows with no key), GQA ratios 1/2/4.
CASES = [
    (1, 1, 1, 2, 1, 64, True),
    (2, 7, 7, 4, 4, 64, True),
    (1, 33, 33, 4, 2, 64, False),
    (2, 65, 65, 4, 1, 64, True),
    (1, 17, 40, 2, 2, 96, True),
    (1, 40, 17, 4, 2, 128, True),
    (1, 33, 65, 4, 4, 128, False),
    (1, 1, 33, 4, 1, 96, True),
]


@implementations
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES,
                         ids=lambda c: "B{}-Tq{}-Tk{}-H{}-Hkv{}-D{}-{}".format(*c[:6], "causal" if c[6] else "full"))
def test_attention_matches_f64(case, dtype, backend, variant):
    need(backend)
    B, Tq, Tk, H, Hkv, D, causal = case
    check_against_f64(*make_qkv(B, Tq, Tk, H, Hkv, D, dtype, CLIP), causal, CLIP, backend=backend, variant=variant)


# Sliding windows (B, Tq, Tk, H, Hkv, D, window): a window of 1 (only itself), windows shorter than a key block
# (5 < 16) and spanning blocks (17), of the sequence (= none), Tq < Tk (a KV cache) and Tq > Tk (rows with no key),
# GQA ratios 1/2/4. All with the clip.
WINDOW_CASES = [
    (1, 37, 37, 4, 1, 32, 1),
    (1, 37, 37, 2, 1, 32, 5),
    (2, 37, 37, 4, 2, 32, 17),
    (1, 37, 37, 2, 2, 32, 37),
    (1, 20, 70, 4, 2, 32, 17),
    (1, 45, 30, 2, 1, 16, 5),
]


@implementations
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", WINDOW_CASES,
                         ids=lambda c: "B{}-Tq{}-Tk{}-H{}-Hkv{}-D{}-window{}".format(*c))
def test_sliding_window_matches_f64(case, dtype, backend, variant):
    need(backend)
    B, Tq, Tk, H, Hkv, D, window = case
    check_against_f64(*make_qkv(B, Tq, Tk, H, Hkv, D, dtype, CLIP), True, CLIP, backend=backend, variant=variant,
                      window=window)


@pytest.mark.parametrize("case", [(2, 70, 131, 6, 2, 40, True), (1, 131, 70, 4, 4, 24, False),
                                  (1, 129, 129, 2, 1, 64, True)], ids=str)
def test_cpp_bf16_and_block_edges(case):
    """cpp's CPU loops in bf16 (no interpreter limit there), an odd head dim, and lengths past the 64-query and
    64-key blocks (ragged last blocks, a causal diagonal crossing block edges, GQA groups of 3 and 2)."""
    need("cpp")
    B, Tq, Tk, H, Hkv, D, causal = case
    check_against_f64(*make_qkv(B, Tq, Tk, H, Hkv, D, torch.bfloat16, CLIP), causal, CLIP, backend="cpp")


@pytest.mark.parametrize("window", [1, 63, 64, 100], ids=str)
def test_cpp_window_across_blocks(window):
    """cpp's CPU loops in bf16 with windows around its 64-key / 64-query blocks (a window that starts mid-block,
    one exactly a block, one spanning two), Tq < Tk, a GQA group of 3 (the backward's per-head query bands)."""
    need("cpp")
    check_against_f64(*make_qkv(1, 150, 200, 6, 2, 40, torch.bfloat16, CLIP), True, CLIP, backend="cpp",
                      window=window)


@pytest.mark.parametrize("shape", [(0, 3, 3, 2, 1, 8), (1, 0, 5, 2, 1, 8), (1, 4, 0, 2, 1, 8)], ids=str)
def test_cpp_empty_shapes(shape):
    """No batch, no query, no key: outputs of the inputs' shapes, no NaN (no key: 0)."""
    need("cpp")
    B, Tq, Tk, H, Hkv, D = shape
    q, k, v = make_qkv(B, Tq, Tk, H, Hkv, D, torch.float32, CLIP)
    with poisoned_allocations():
        got = run(q, k, v, torch.randn(q.shape, device=DEVICE), False, CLIP, "cpp")
    for g, x in zip(got, (q, q, k, v)):
        assert g.shape == x.shape and not g.isnan().any()
    assert (got[0] == 0).all()


def test_cpp_nan_input():
    """A NaN in key 2 stays NaN through the clamp (torch.clamp's rule): causal queries that see it give NaN, the
    others (queries 0, 1) are torch's on a clean cache, and the NaN entry gets no gradient (the clamp's NaN rule).
    (Torch's masked SDPA spreads the NaN to every row; flash attention never reads a key a row does not see.)"""
    need("cpp")
    q, k, v = make_qkv(1, 4, 4, 2, 1, 8, torch.float32, CLIP)
    k = k.clone()
    k[0, 2, 0, 3] = float("nan")
    dout = torch.randn(q.shape, device=DEVICE)
    got = run(q, k, v, dout, True, CLIP, "cpp")
    want = run(q[:, :2], k[:, :2], v[:, :2], dout[:, :2], True, CLIP, "torch")
    assert got[0][:, 2:].isnan().all()
    torch.testing.assert_close(got[0][:, :2], want[0])
    assert got[2][0, 2, 0, 3] == 0


@implementations
@pytest.mark.parametrize("causal", [True, False])
def test_attention_without_clip_and_custom_scale(causal, backend, variant):
    """Large scores (3x inputs): the running max jumps by more than the "tma" forward's lazy-rescale threshold
    (2^8) between key blocks, so both its rescaling branches run."""
    need(backend)
    q, k, v = make_qkv(2, 19, 23, 4, 2, 64, torch.float16, None)
    check_against_f64(3 * q, 3 * k, v, causal, None, scale=0.3, backend=backend, variant=variant)


@implementations
def test_fully_masked_rows_are_zero(backend, variant):
    """Tq > Tk with a causal mask: the first Tq - Tk queries see no key -> output 0, no gradient, no NaN."""
    need(backend)
    q, k, v = make_qkv(1, 21, 5, 2, 1, 64, torch.float32, CLIP)
    out, dq, dk, dv = check_against_f64(q, k, v, True, CLIP, backend=backend, variant=variant)
    assert (out[:, :16] == 0).all() and (dq[:, :16] == 0).all()
    assert out[:, 16:].abs().sum() > 0


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("blocks", [(16, 16), (16, 32), (32, 16), (64, 32)], ids=str)
def test_block_shapes(blocks, variant):
    """The range logic (unmasked/masked block split, bottom-right diagonal, sliding windows' first blocks) for
    other BLOCK_M/BLOCK_N pairs than the interpreter's default ones: every kernel is forced onto the given config."""
    need("triton")
    import triton

    from olmo_fast.kernels import attention as kern
    from olmo_fast.kernels import attention_tma

    tuners = (kern._attn_fwd, attention_tma._attn_fwd_tma, kern._attn_bwd_dkdv, kern._attn_bwd_dq)
    saved = [(t.configs, dict(t.cache)) for t in tuners]
    try:
        for t in tuners:
            t.configs = [triton.Config({"BLOCK_M": blocks[0], "BLOCK_N": blocks[1]}, num_warps=4, num_stages=1)]
            t.cache.clear()
        for Tq, Tk, window in ((37, 50, None), (50, 37, None), (37, 70, 5), (50, 50, 17)):
            check_against_f64(*make_qkv(1, Tq, Tk, 4, 2, 64, torch.float32, CLIP), True, CLIP, variant=variant,
                              window=window)
    finally:
        for t, (configs, cache) in zip(tuners, saved):
            t.configs, t.cache = configs, cache


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_through_expanded_dout_and_opcheck(backend):
    """`out.sum().backward()` hands the backward an all-stride-0 gradient; and the custom ops pass opcheck
    (schema, fake tensors, autograd registration)."""
    need(backend)
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 9, 9, 2, 1, 64, torch.float32, CLIP))
    ops.attention(q, k, v, clip=CLIP, backend=backend).sum().backward()
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    reference.attention(qd, kd, vd, True, CLIP).sum().backward()
    for got, want in ((q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)

    for window in (None, 4):
        args = (q.detach(), k.detach(), v.detach(), True, CLIP, 0.125, window, backend, "fa2")
        torch.library.opcheck(torch.ops.olmo_fast.attention_fwd.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise(backend):
    need(backend)
    q = torch.randn(1, 4, 3, 64, device=DEVICE)
    k = torch.randn(1, 4, 2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="multiple"):
        ops.attention(q, k, k, backend=backend)
    with pytest.raises(ValueError, match="dtype"):
        ops.attention(q, q.half(), q.half(), backend=backend)
    with pytest.raises(ValueError, match="not an attention variant"):
        ops.attention(q, q, q, backend=backend, variant="fa9")
    with pytest.raises(ValueError, match="window"):
        ops.attention(q, q, q, window=0, backend=backend)
    with pytest.raises(ValueError, match="causal"):
        ops.attention(q, q, q, causal=False, window=4, backend=backend)


def test_variant_from_environment(monkeypatch):
    """OLMO_FAST_ATTENTION picks the kernels when no `variant` is passed (forward and backward of that variant),
    an explicit `variant` wins over it, and an unknown name in it fails with one clear error."""
    from olmo_fast.kernels import attention_variants

    calls = []

    def spy(name, fn):
        return lambda *args: calls.append(name) or fn(*args)

    fwd, bwd = attention_variants.VARIANTS["tma"]
    monkeypatch.setitem(attention_variants.VARIANTS, "tma", (spy("tma_fwd", fwd), spy("tma_bwd", bwd)))
    monkeypatch.setenv("OLMO_FAST_ATTENTION", "tma")
    q = torch.randn(1, 5, 2, 16, device=DEVICE, requires_grad=True)
    ops.attention(q, q, q, backend="triton").sum().backward()
    assert calls == ["tma_fwd", "tma_bwd"]
    ops.attention(q, q, q, backend="triton", variant="fa2")
    assert calls == ["tma_fwd", "tma_bwd"]
    monkeypatch.setenv("OLMO_FAST_ATTENTION", "flash9")
    with pytest.raises(ValueError, match="OLMO_FAST_ATTENTION='flash9' is not an attention variant"):
        ops.attention(q, q, q, backend="triton")


def test_variant_names_are_the_kernels():
    """ops' list of variant names (checked on every call) names exactly the Triton kernel sets."""
    need("triton")
    from olmo_fast.kernels import attention_variants

    assert tuple(attention_variants.VARIANTS) == VARIANTS


def test_bench_has_a_row_per_variant():
    """`olmo-fast bench --ops attention` A/B-tests the variants: `ours-triton` (the default variant) and
    `ours-triton[<variant>]` for each other one, each calling ops.attention with that variant."""
    from olmo_fast.benchmarks import providers

    names = [p.name for p in providers.registry()["attention"]]
    others = [v for v in VARIANTS if v != ops.softmax_attention.DEFAULT_VARIANT]
    assert others and names[:1 + len(others)] == ["ours-triton"] + [f"ours-triton[{v}]" for v in others]


@pytest.mark.parametrize("backend", BACKENDS)
def test_olmo_with_attention_backend_matches_torch(monkeypatch, backend):
    """The test OLMo with clip_qkv small enough to clip ~30% of q/k/v, attention on the backend and every
    other op on torch: logits and every parameter gradient within 2x the fp32 torch model's error vs float64, plus
SLACK eps times the tensor's largest magnitude."""
    cfg = ModelConfig.preset("test", clip_qkv=0.5, n_kv_heads=2)
    model = OLMo(cfg, backend="torch").to(DEVICE)
    model64 = OLMo(cfg, backend="torch").to(DEVICE).double()
    model64.load_state_dict(model.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 23), device=DEVICE)

    def logits_and_grads(m):
        m.zero_grad()
        logits, loss = m(ids, labels=ids)
        loss.backward()
        return [logits] + [p.grad for p in m.parameters()]

    want, same = logits_and_grads(model64), logits_and_grads(model)
    attention = ops.attention
    need(backend)
    monkeypatch.setattr(ops, "attention", lambda *a, **kw: attention(*a, **{**kw, "backend": backend}))
    got = logits_and_grads(model)
    for i, (g, s, w) in enumerate(zip(got, same, want)):
        err, base = (g.double() - w).abs().max().item(), (s.double() - w).abs().max().item()
        slack = SLACK * dot_eps(torch.float32) * w.abs().max().item()
        assert err <= 2 * base + slack, f"tensor {i}: {backend} error {err:.3g} vs torch fp32 error {base:.3g}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 tl.dot needs a GPU (the interpreter's is wrong)")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [(2, 257, 257, 8, 2, 128, True), (1, 1000, 1000, 4, 4, 64, False),
                                  (2, 100, 300, 4, 1, 96, True), (1, 300, 100, 8, 8, 128, True)], ids=str)
def test_attention_gpu(case, dtype, variant):
    need("triton")
    B, Tq, Tk, H, Hkv, D, causal = case
    check_against_f64(*make_qkv(B, Tq, Tk, H, Hkv, D, dtype, CLIP), causal, CLIP, variant=variant)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 tl.dot needs a GPU (the interpreter's is wrong)")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [(2, 1000, 1000, 8, 2, 128, 256), (1, 300, 1000, 4, 4, 64, 100),
                                  (1, 777, 777, 4, 1, 128, 1)], ids=str)
def test_sliding_window_gpu(case, dtype, variant):
    need("triton")
    B, Tq, Tk, H, Hkv, D, window = case
    check_against_f64(*make_qkv(B, Tq, Tk, H, Hkv, D, dtype, CLIP), True, CLIP, variant=variant, window=window)


def test_row_offsets_are_int64():
    """Row offsets t * stride_t past 2^31 (a fused-qkv view of a long sequence: stride 3 * 4096, T ~ 175K) come out
    exact, not wrapped in int32: the kernels' `row_offsets` helper, run on the interpreter's int32 arguments."""
    need("triton")
    start, stride, block = 174_760, 3 * 4096, 16
    out = torch.full((block, 1), -1, dtype=torch.int64, device=DEVICE)
    _store_row_offsets[(1,)](out, start, stride, BLOCK=block)
    want = (start + torch.arange(block, device=DEVICE, dtype=torch.int64)) * stride
    assert want.max() > 2 ** 31 and torch.equal(out.flatten(), want)


def _sees(t, j, Tq, Tk, window):
    """Whether query row t sees key j (causal, bottom-right, sliding window): the definition, written out."""
    i = t + Tk - Tq
    return 0 <= j <= i and i - j < window


@pytest.mark.parametrize("blocks", [(16, 16), (16, 32), (32, 16), (64, 32)], ids=str)
def test_window_loop_bounds_skip_blocks(blocks):
    """The windowed kernels' loop bounds (`kv_range`: key blocks of a query block, for the forward and dQ;
    `q_range`: query blocks of a key block, for dK/dV), run as Triton code, against the visibility rule by
    brute force: every visible (query, key) pair lies inside the visited range, the first visited block is the
    one that holds the first visible key (the blocks before it are skipped, not masked: for a key block no query
    sees, nothing is visited), the last visited block holds a visible pair, and the unmasked middle range is
    visible to every row."""
    need("triton")
    BM, BN = blocks
    for Tq, Tk in ((37, 37), (20, 70), (70, 37), (1, 40)):
        for window in (1, 5, 16, 17, 33, 100):
            programs = max(triton.cdiv(Tq, BM), triton.cdiv(Tk, BN))
            out = torch.full((programs, 8), -1, dtype=torch.int32, device=DEVICE)
            _store_ranges[(programs,)](out, Tq, Tk, window, BLOCK_M=BM, BLOCK_N=BN)
            for pid, (n_lo, w_full, n_full, n_end, m_lo, m_full, m_wfull, m_hi) in enumerate(out.tolist()):
                where = f"Tq={Tq} Tk={Tk} window={window} block {pid}"
                if pid * BM < Tq:  # the query block's key range
                    rows = range(pid * BM, min(pid * BM + BM, Tq))
                    keys = [j for j in range(Tk) if any(_sees(t, j, Tq, Tk, window) for t in rows)]
                    assert 0 <= n_lo <= w_full <= n_full <= n_end and n_lo % BN == 0, where
                    if keys:
                        assert n_lo == keys[0] // BN * BN and keys[-1] < n_end <= (keys[-1] // BN + 1) * BN, where
                    else:
                        assert n_end <= n_lo, where
                    assert all(_sees(t, j, Tq, Tk, window) for t in rows for j in range(w_full, n_full)), where
                if pid * BN < Tk:  # the key block's query range
                    cols = range(pid * BN, min(pid * BN + BN, Tk))
                    seers = [t for t in range(Tq) if any(_sees(t, j, Tq, Tk, window) for j in cols)]
                    assert 0 <= m_lo <= m_full <= m_wfull <= m_hi <= Tq and m_lo % BM == 0, where
                    if seers:
                        assert m_lo == seers[0] // BM * BM and seers[-1] < m_hi, where
                        assert (m_hi - 1) // BM * BM <= seers[-1], where
                    else:
                        assert m_hi <= m_lo, where
                    assert all(_sees(t, j, Tq, Tk, window) for t in range(m_full, m_wfull) for j in cols), where


if triton is not None:
    @triton.jit
    def _store_row_offsets(OUT, start, stride, BLOCK: tl.constexpr):
        tl.store(OUT + tl.arange(0, BLOCK)[:, None], row_offsets(start + tl.arange(0, BLOCK), stride))

    @triton.jit
    def _store_ranges(OUT, Tq, Tk, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Row pid of OUT: kv_range of the query block at pid * BLOCK_M, q_range of the key block at
        pid * BLOCK_N (causal, windowed)."""
        pid = tl.program_id(0)
        n_lo, w_full, n_full, n_end = kv_range(pid * BLOCK_M, Tq, Tk, window, True, True, BLOCK_M, BLOCK_N)
        m_lo, m_full, m_wfull, m_hi = q_range(pid * BLOCK_N, Tq, Tk, window, True, True, BLOCK_M, BLOCK_N)
        row = OUT + pid * 8
        tl.store(row + 0, n_lo)
        tl.store(row + 1, w_full)
        tl.store(row + 2, n_full)
        tl.store(row + 3, n_end)
        tl.store(row + 4, m_lo)
        tl.store(row + 5, m_full)
        tl.store(row + 6, m_wfull)
        tl.store(row + 7, m_hi)
