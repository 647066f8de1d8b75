"""The fused linear + cross-entropy (`ops.linear_cross_entropy`) and its per-chunk kernel against float64
`F.cross_entropy(x @ W.T, y)`.

Tolerance (flash-attention's rule): the error against float64 is at most 2x that of plain PyTorch in the same
dtype (fp32 `F.cross_entropy(x @ W.T)`), plus a tiny absolute slack.

`python tests/test_linear_cross_entropy.py` measures peak memory at OLMo-7B's vocab (see `measure_memory`).
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, assert_within_2x, poisoned_allocations, require_kernel_where_registered

from olmo_fast import nn, ops

BACKENDS = ["torch", "triton", "cpp"]


def _require(backend: str) -> None:
    if backend != "torch":
        require_kernel_where_registered("cross_entropy_chunk", backend)


def _loss_and_grads(fn, x, w, y, **kw):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    loss = fn(x, w, y, **kw)
    return (loss.detach(), *torch.autograd.grad(loss, (x, w)))


def _plain(x, w, y, ignore_index=-100, reduction="mean"):
    """Materialised logits: fp32 for fp32/half inputs (as HF's loss), float64 for the float64 reference."""
    logits = x @ w.t()
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(logits, y, ignore_index=ignore_index, reduction=reduction)


def _check_close(ours, plain, ref, slack=1e-6):
    for name, o, p, r in zip(("loss", "dx", "dW"), ours, plain, ref):
        assert not torch.isnan(o).any(), name
        o, p, r = o.reshape(r.shape).double(), p.double(), r
        err, base = (o - r).abs().max().item(), (p - r).abs().max().item()
        assert err <= 2 * base + slack, f"{name}: error {err:.3g} vs plain fp32 {base:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_size", [8, None])
def test_matches_float64_cross_entropy(backend, reduction, chunk_size):
    _require(backend)
    x = torch.randn(3, 13, 19, device=DEVICE)  # 39 tokens: chunks of 8 leave a ragged last one
    w = torch.randn(203, 19, device=DEVICE) / 3
    y = torch.randint(0, 203, (3, 13), device=DEVICE)
    y[0, ::4] = -100
    y[2, 5] = -100
    kw = dict(reduction=reduction)
    ours = _loss_and_grads(ops.linear_cross_entropy, x, w, y, chunk_size=chunk_size, backend=backend, **kw)
    plain = _loss_and_grads(_plain, x.reshape(-1, 19), w, y.reshape(-1), **kw)
    ref = _loss_and_grads(_plain, x.reshape(-1, 19).double(), w.double(), y.reshape(-1), **kw)
    assert ours[1].shape == x.shape
    _check_close(ours, plain, ref)


def test_default_chunk_size():
    from olmo_fast.ops.cross_entropy import MIN_CHUNK_LOGITS, default_chunk_size

    # a large vocabulary: Liger's rule, logits about x's size (8192 tokens x 4096 wide over 100352 words: 25
    # chunks of 328 tokens -> 512, a power of two)
    assert default_chunk_size(8192, 100352, 4096) == 512
    # a small one: the floor of MIN_CHUNK_LOGITS logits (the whole of 67 tokens x 515 words in one chunk)
    assert default_chunk_size(67, 515, 48) == 2048 and 2048 * 515 >= MIN_CHUNK_LOGITS > 1024 * 515


def test_labels_out_of_range_fail_before_any_work():
    x, w = torch.randn(5, 4, device=DEVICE), torch.randn(7, 4, device=DEVICE)
    for bad in (7, -1, -99):
        y = torch.tensor([0, -100, 6, bad, 3], device=DEVICE)
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 7\) or equal ignore_index=-100"):
            ops.linear_cross_entropy(x, w, y, backend="torch")
    y = torch.tensor([0, -100, 6, 1, 3], device=DEVICE)  # ignore_index itself is fine, so is an empty batch
    assert torch.isfinite(ops.linear_cross_entropy(x, w, y, backend="torch"))
    empty = ops.linear_cross_entropy(x[:0], w, y[:0], reduction="sum", backend="torch")
    assert empty.item() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index_non_contiguous_and_single_token(backend):
    _require(backend)
    base = torch.randn(19, 2 * 11, device=DEVICE)
    x = base[:, ::2]  # non-contiguous rows
    w = torch.randn(101, 11, device=DEVICE).t().contiguous().t()  # a transposed view of [11, 101]
    y = torch.randint(0, 101, (19,), device=DEVICE)
    y[3:7] = 7  # ignore_index=7 masks these (and any random 7)
    kw = dict(ignore_index=7)
    ours = _loss_and_grads(ops.linear_cross_entropy, x, w, y, chunk_size=5, backend=backend, **kw)
    plain = _loss_and_grads(_plain, x, w, y, **kw)
    ref = _loss_and_grads(_plain, x.double(), w.double(), y, **kw)
    _check_close(ours, plain, ref)
    one = _loss_and_grads(ops.linear_cross_entropy, x[:1], w, y[:1], backend=backend, **kw)
    _check_close(one, _loss_and_grads(_plain, x[:1], w, y[:1], **kw),
                 _loss_and_grads(_plain, x[:1].double(), w.double(), y[:1], **kw))


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_and_no_grad(backend):
    _require(backend)
    x = torch.randn(23, 17, device=DEVICE, requires_grad=True)
    w = torch.randn(67, 17, device=DEVICE)  # frozen: no dW is computed or returned
    y = torch.randint(0, 67, (23,), device=DEVICE)
    loss = ops.linear_cross_entropy(x, w, y, chunk_size=6, backend=backend)
    (dx,) = torch.autograd.grad(loss, (x,))
    ref = _plain(x.double(), w.double(), y)
    (dx_ref,) = torch.autograd.grad(ref, (x,))
    torch.testing.assert_close(dx.double(), dx_ref.double(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(ops.linear_cross_entropy(x, w, y, backend=backend).double(), ref.detach(),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("z_loss", [0.0, 0.02])
def test_chunk_kernel_against_float64(backend, dtype, z_loss):
    """The "cross_entropy_chunk" step alone: losses (z-loss term included) and lse, and the gradient written in
    place into a strided view whose neighbouring columns must stay untouched."""
    _require(backend)
    from olmo_fast.ops import dispatch, reference

    kernel = reference.cross_entropy_chunk if backend == "torch" else dispatch.kernel("cross_entropy_chunk",
                                                                                      backend, DEVICE)
    n, vocab = 9, 4099 + 2  # > one 4096-wide block: exercises the loop and its ragged tail
    buffer = torch.full((n, vocab + 5), 1234.0, device=DEVICE, dtype=dtype)
    logits = buffer[:, 2:2 + vocab]
    logits.copy_(torch.randn(n, vocab, device=DEVICE) * 4)
    y = torch.randint(0, vocab, (n,), device=DEVICE)
    y[4] = -100
    valid = y != -100

    def per_row_loss(z):  # cross-entropy + OLMo's z-loss term, 0 on ignored rows
        lse = torch.logsumexp(z, -1)
        return F.cross_entropy(z, y, reduction="none") + z_loss * torch.where(valid, lse.square(), 0.0), lse

    z64 = logits.double().clone().requires_grad_()
    per_row, lse64 = per_row_loss(z64)
    (grad_ref,) = torch.autograd.grad(per_row.sum(), (z64,))
    plain_loss, plain_lse = per_row_loss(logits.clone().float())  # the same inputs in fp32
    with poisoned_allocations():
        losses, lse = kernel(logits, y, -100, True, z_loss)
    assert losses.dtype == lse.dtype == torch.float32
    assert (losses.double() - per_row).abs().max() <= 2 * (plain_loss.double() - per_row).abs().max() + 1e-5
    lse64 = torch.where(valid, lse64, 0.0).detach()
    assert (lse.double() - lse64).abs().max() <= 2 * (plain_lse.double() - lse64)[valid].abs().max() + 1e-5
    assert lse[4] == 0  # the ignored row
    grad_tol = 1e-6 if dtype == torch.float32 else 1e-3  # the gradient is stored in the logits' dtype
    torch.testing.assert_close(logits.double(), grad_ref, rtol=0, atol=grad_tol)
    assert (buffer[:, :2] == 1234).all() and (buffer[:, 2 + vocab:] == 1234).all()
    fresh = torch.randn(n, vocab, device=DEVICE, dtype=dtype)
    before = fresh.clone()
    kernel(fresh, y, -100, False, z_loss)
    assert torch.equal(fresh, before)  # loss only: the logits are left as they are


def _olmo_core_loss(x, w, y, z_loss, reduction="mean"):
    """OLMo-core's definition, materialised: cross-entropy of the logits (fp32, or float64) plus
    `z_loss * logsumexp(logits)^2` of the labelled tokens, summed or averaged over them. -> (loss, z part)."""
    logits = x @ w.t()
    logits = logits if logits.dtype == torch.float64 else logits.float()
    mask = y != -100
    z_squared = (torch.logsumexp(logits, -1).square() * mask).sum()
    z_part = z_loss * (z_squared / mask.sum() if reduction == "mean" else z_squared)
    return F.cross_entropy(logits, y, reduction=reduction) + z_part, z_part


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_z_loss_matches_olmo_core_in_float64(backend, dtype, reduction):
    """loss = CE + z_loss * lse^2 (OLMo-core), its gradients through the fused kernel, and the detached z part,
    against float64 by the 2x same-dtype rule: an odd vocabulary (1003), ragged chunks, ignored tokens, a
    strided x, and a batch of one token."""
    _require(backend)
    z_loss, vocab, d = 1e-2, 1003, 24
    x = torch.randn(41, d + 3, device=DEVICE)[:, 1:d + 1].to(dtype)  # strided rows
    w = (torch.randn(vocab, d, device=DEVICE) / 3).to(dtype)
    y = torch.randint(0, vocab, (41,), device=DEVICE)
    y[::5] = -100

    def ours(a, b, labels):
        return ops.linear_cross_entropy(a, b, labels, chunk_size=8, reduction=reduction, z_loss=z_loss,
                                        return_z_loss=True, backend=backend)

    def theirs(a, b, labels):
        return _olmo_core_loss(a, b, labels, z_loss, reduction)

    def run(fn, a, b, labels):
        a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
        loss, z_part = fn(a, b, labels)
        return [loss.detach(), z_part.detach(), *torch.autograd.grad(loss, (a, b))], z_part

    for rows in (slice(None), slice(1, 2)):  # every token, then a batch of one
        xs, ys = x[rows], y[rows]
        with poisoned_allocations():
            got, z_part = run(ours, xs, w, ys)
        assert not z_part.requires_grad
        same, _ = run(theirs, xs, w, ys)
        ref, _ = run(theirs, xs.double(), w.double(), ys)
        for name, g, s, r in zip(("loss", "z part", "dx", "dW"), got, same, ref):
            assert_within_2x(name, g, s, r)
        assert ref[1] > 0.05 * ref[0]  # the z-loss term is not negligible in this test


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_z_loss_is_exactly_the_plain_loss(backend):
    """z_loss = 0 changes no bit of the loss or the gradients, and its reported z part is exactly 0."""
    _require(backend)
    x, w = torch.randn(19, 13, device=DEVICE), torch.randn(1001, 13, device=DEVICE) / 3
    y = torch.randint(0, 1001, (19,), device=DEVICE)
    y[2] = -100
    plain = _loss_and_grads(ops.linear_cross_entropy, x, w, y, chunk_size=4, backend=backend)

    def zero(a, b, labels, **kw):
        loss, z_part = ops.linear_cross_entropy(a, b, labels, z_loss=0.0, return_z_loss=True, **kw)
        assert z_part.item() == 0.0
        return loss

    for got, want in zip(_loss_and_grads(zero, x, w, y, chunk_size=4, backend=backend), plain):
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_causal_lm_loss_threads_z_loss(backend, fused):
    """`nn.causal_lm_loss` / `nn.CausalLMLoss` with z_loss, fused or through fp32 logits, against float64
    OLMo-core on the next-token labels; return_z_loss adds the detached z part, and without it the shapes of
    the results are as before."""
    _require(backend)
    B, T, d, vocab, z_loss = 2, 7, 16, 999, 1e-3
    hidden, w = torch.randn(B, T, d, device=DEVICE), torch.randn(vocab, d, device=DEVICE) / 2
    labels = torch.randint(0, vocab, (B, T), device=DEVICE)
    labels[0, 3] = -100
    targets = nn.next_token_labels(labels)
    module = nn.CausalLMLoss(backend=backend)
    h = hidden.detach().requires_grad_()
    logits, loss, z_part = module(h, w, labels, fused=fused, z_loss=z_loss, return_z_loss=True)
    assert (logits is None) == fused and not z_part.requires_grad
    (dh,) = torch.autograd.grad(loss, (h,))
    h64 = hidden.double().requires_grad_()
    ref, ref_z = _olmo_core_loss(h64.reshape(-1, d), w.double(), targets.reshape(-1), z_loss)
    (dh64,) = torch.autograd.grad(ref, (h64,))
    same, same_z = _olmo_core_loss(hidden.reshape(-1, d), w, targets.reshape(-1), z_loss)
    h32 = hidden.detach().requires_grad_()
    (dh32,) = torch.autograd.grad(_olmo_core_loss(h32.reshape(-1, d), w, targets.reshape(-1), z_loss)[0], (h32,))
    for name, g, s, r in (("loss", loss, same, ref), ("z part", z_part, same_z, ref_z), ("dh", dh, dh32, dh64)):
        assert_within_2x(name, g.detach(), s.detach(), r.detach())
    out = nn.causal_lm_loss(hidden, w, targets, fused=fused, backend=backend)  # no z-loss: two results
    assert len(out) == 2 and out[1] < loss


def test_cpp_chunk_schema_and_fake_kernel():
    """The C++ "cross_entropy_chunk" schema (logits mutated in place, z_loss defaulting to 0) and its fake kernel
    agree with the real one (torch.library.opcheck)."""
    require_kernel_where_registered("cross_entropy_chunk", "cpp", "cpu")
    logits, labels = torch.randn(5, 37), torch.tensor([1, -100, 36, 0, 7])
    for args in ((logits, labels, -100, True, 0.01), (logits.half(), labels, -100, False)):
        torch.library.opcheck(torch.ops.olmo_fast_C.cross_entropy_chunk, args,
                              test_utils=("test_schema", "test_faketensor"))


def test_second_backward_is_refused():
    """The backward scales the saved gradients in place: autograd's version check refuses a second pass."""
    x, w = torch.randn(5, 8, requires_grad=True), torch.randn(10, 8, requires_grad=True)
    loss = ops.linear_cross_entropy(x, w, torch.randint(0, 10, (5,)), backend="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_autocast_does_not_reach_the_chunk_matmuls():
    """The op computes in its inputs' dtype: a surrounding autocast must not turn its fp32 matmuls into bf16."""
    x, w = torch.randn(9, 16, requires_grad=True), torch.randn(50, 16, requires_grad=True)
    y = torch.randint(0, 50, (9,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ops.linear_cross_entropy(x, w, y, backend="torch")
    loss.backward()
    ref = _plain(x.double(), w.double(), y)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), torch.autograd.grad(ref, (x,))[0].double(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiles_fullgraph_and_matches_eager(backend):
    """torch.compile traces the op (its custom op's fake and autograd) without a graph break. (opcheck's
    aot_dispatch test rejects it: the backward scales the saved gradient outputs in place.)"""
    _require(backend)
    torch._dynamo.reset()
    x, w = torch.randn(7, 5, device=DEVICE), torch.randn(11, 5, device=DEVICE)
    y = torch.tensor([1, 2, -100, 4, 10, 0, 3], device=DEVICE)

    def step(x, w):
        return 3.0 * ops.linear_cross_entropy(x, w, y, chunk_size=3, backend=backend)

    eager = _loss_and_grads(lambda a, b, _: step(a, b), x, w, y)
    compiled = _loss_and_grads(lambda a, b, _: torch.compile(step, fullgraph=True, backend="aot_eager")(a, b),
                               x, w, y)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=0, atol=0)


def test_clear_errors():
    x, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="reduction"):
        ops.linear_cross_entropy(x, w, torch.zeros(4, dtype=torch.long), reduction="none")
    with pytest.raises(ValueError, match="labels"):
        ops.linear_cross_entropy(x, w, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="dtype"):
        ops.linear_cross_entropy(x, w.double(), torch.zeros(4, dtype=torch.long))
    for bad in (-1e-4, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="z_loss"):
            ops.linear_cross_entropy(x, w, torch.zeros(4, dtype=torch.long), z_loss=bad)
        with pytest.raises(ValueError, match="z_loss"):
            nn.causal_lm_loss(x, w, torch.zeros(4, dtype=torch.long), fused=False, z_loss=bad)


def test_bad_label_is_reported_by_fused_backends():
    require_kernel_where_registered("cross_entropy_chunk", "triton")
    x, w = torch.randn(4, 8, device=DEVICE), torch.randn(10, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        ops.linear_cross_entropy(x, w, torch.tensor([1, 2, 10, -100], device=DEVICE), backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_labels_false_skips_only_the_check(backend):
    """The trainer passes check_labels=False (its token files are checked up front): the same loss and
    gradients, and on a GPU no host sync at all (the check's bool() is one per micro-batch)."""
    _require(backend)
    x, w = torch.randn(37, 19, device=DEVICE), torch.randn(203, 19, device=DEVICE) / 3
    y = torch.randint(0, 203, (37,), device=DEVICE)
    y[::5] = -100
    checked = _loss_and_grads(ops.linear_cross_entropy, x, w, y, reduction="sum", backend=backend)
    unchecked = _loss_and_grads(ops.linear_cross_entropy, x, w, y, reduction="sum", check_labels=False,
                                backend=backend)
    for a, b in zip(checked, unchecked):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            ops.linear_cross_entropy(x, w, y, check_labels=False, backend=backend)
            with pytest.raises(RuntimeError, match="synchroniz"):
                ops.linear_cross_entropy(x, w, y, backend=backend)
        finally:
            torch.cuda.set_sync_debug_mode("default")


_COMPILE_FOR_GPUS = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from olmo_fast.kernels import _launch, linear_cross_entropy as lce
count = 0
for dtype in ("*fp32", "*fp16", "*bf16"):
    for grad in (True, False):
        signature = dict(logits_ptr=dtype, row_stride="i32", labels_ptr="*i64", loss_ptr="*fp32", lse_ptr="*fp32",
                         V="i32", ignore_index="i32", z_loss="fp32", COMPUTE_GRAD="constexpr", BLOCK="constexpr")
        for target in (GPUTarget("cuda", 90, 32), GPUTarget("hip", "gfx90a", 64)):
            _launch.warp_size = lambda target=target: target.warp_size
            source = ASTSource(fn=lce._cross_entropy_chunk_kernel, signature=signature,
                               constexprs=dict(COMPUTE_GRAD=grad, BLOCK=4096))
            triton.compile(source, target=target, options=dict(num_warps=_launch.num_warps(4096)))
            count += 1
print("compiled", count)
"""


def test_kernel_compiles_for_nvidia_and_amd():
    """The interpreter does not type-check like the compiler: compile for sm_90 (warp 32) and gfx90a (wave 64)
    in each dtype, with and without the gradient pass (no GPU needed)."""
    require_kernel_where_registered("cross_entropy_chunk", "triton")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_GPUS], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["compiled", "12"], done.stdout


def test_cpp_bf16_against_float64():
    """The "cpp" chunk loop and the whole op on bf16 inputs: losses and gradients within 2x the error of plain
    bf16 PyTorch (bf16 logits, fp32 softmax, the gradient rounded to bf16) against float64."""
    _require("cpp")
    from olmo_fast.ops import dispatch

    kernel = dispatch.kernel("cross_entropy_chunk", "cpp", DEVICE)
    n, vocab = 7, 1031
    logits = (torch.randn(n, vocab, device=DEVICE) * 4).to(torch.bfloat16)
    y = torch.randint(0, vocab, (n,), device=DEVICE)
    y[3] = -100
    z64 = logits.double().requires_grad_()
    per_row = F.cross_entropy(z64, y, reduction="none")
    (grad_ref,) = torch.autograd.grad(per_row.sum(), (z64,))
    z32 = logits.float().requires_grad_()
    plain_loss = F.cross_entropy(z32, y, reduction="none")
    (plain_grad,) = torch.autograd.grad(plain_loss.sum(), (z32,))
    losses, _ = kernel(logits, y, -100, True)
    # the slack: fp32 rounding of losses of magnitude up to max |loss|
    slack = 4 * torch.finfo(torch.float32).eps * per_row.abs().max()
    assert (losses.double() - per_row).abs().max() <= 2 * (plain_loss.double() - per_row).abs().max() + slack
    plain_err = (plain_grad.to(torch.bfloat16).double() - grad_ref).abs().max()
    assert (logits.double() - grad_ref).abs().max() <= 2 * plain_err

    x = torch.randn(23, 37, device=DEVICE, dtype=torch.bfloat16)
    w = (torch.randn(301, 37, device=DEVICE) / 6).to(torch.bfloat16)
    y = torch.randint(0, 301, (23,), device=DEVICE)
    y[::3] = -100
    ours = _loss_and_grads(ops.linear_cross_entropy, x, w, y, chunk_size=8, backend="cpp")
    plain = _loss_and_grads(_plain, x, w, y)
    ref = _loss_and_grads(_plain, x.double(), w.double(), y)
    _check_close(ours, plain, ref)


# ---------------------------------------------------------------- peak memory (run this file as a script)
_MEASURE = """
import resource, sys, torch, torch.nn.functional as F
from olmo_fast import ops
n, d, v, mode = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
x = torch.randn(n, d, requires_grad=True)
w = (torch.randn(v, d) / d ** 0.5).requires_grad_()
y = torch.randint(0, v, (n,))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if mode == "plain":
    loss = F.cross_entropy(x @ w.t(), y)
else:
    loss = ops.linear_cross_entropy(x, w, y, backend=mode)
loss.backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((peak - base) / 2**10, loss.item())
"""


def measure_memory(n_tokens: int = 4096, hidden: int = 4096, vocab: int = 50304) -> None:
    """Peak memory of loss + backward, fp32 on the CPU, as the growth of the process's peak resident set
    (ru_maxrss) over its value once x, W and y exist: each variant runs in a fresh process."""
    inputs = (n_tokens * hidden + vocab * hidden) * 4 / 2**20
    print(f"x [{n_tokens}, {hidden}] + W [{vocab}, {hidden}] fp32 = {inputs:.0f} MiB of inputs")
    for mode in ("plain", "torch", "triton", "cpp"):  # triton: under the interpreter (slow, but same buffers)
        env = dict(os.environ, TRITON_INTERPRET="1") if mode == "triton" else os.environ
        out = subprocess.run([sys.executable, "-c", _MEASURE, str(n_tokens), str(hidden), str(vocab), mode],
                             capture_output=True, text=True, env=env)
        if out.returncode:
            print(f"{mode:>6}: not run ({out.stderr.strip().splitlines()[-1]})")
            continue
        out = out.stdout.split()
        print(f"{mode:>6}: peak growth {float(out[0]):8.0f} MiB  (loss {float(out[1]):.4f})")


if __name__ == "__main__":
    measure_memory()
