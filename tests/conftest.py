"""Shared test setup. Without a GPU the Triton kernels run under the interpreter (TRITON_INTERPRET=1),
which must be set before Triton is first imported."""
import contextlib
import os

import pytest
import torch
from emulated_gpu import gpu  # noqa: F401 - the emulated CUDA/HIP kernels, a session fixture for every test file

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def require_kernel(op: str, backend: str, device: str = DEVICE) -> None:
    """Skip a test of `backend`'s `op` where that backend is not built/installed here - unless the backend is
    listed in OLMO_FAST_REQUIRE_BACKENDS (default under CI=true: "triton,cpp", all that CI builds), where a
    missing one fails the test."""
    from olmo_fast.ops import dispatch

    try:
        dispatch.kernel(op, backend, device)
    except dispatch.BackendError as err:
        default = "triton,cpp" if os.environ.get("CI") == "true" else ""
        required = [b for b in os.environ.get("OLMO_FAST_REQUIRE_BACKENDS", default).split(",") if b]
        if backend in required:
            pytest.fail(f"backend {backend!r} is required here but unavailable: {err}")
        pytest.skip(str(err))


def require_kernel_where_registered(op: str, backend: str, device: str = DEVICE) -> None:
    """`require_kernel`, except that a backend which is built but registers no `op` kernel at all (it does not
    implement that op, e.g. "cpp" and "cross_entropy_chunk") skips the test instead of failing it under CI."""
    from olmo_fast.ops import dispatch

    info = dispatch.status().get(backend, {})
    if "ops" in info and op not in info["ops"]:
        pytest.skip(f"the {backend!r} backend implements no {op!r} kernel")
    require_kernel(op, backend, device)


@contextlib.contextmanager
def poisoned_allocations():
    """Every float tensor that torch.empty / torch.empty_like allocate meanwhile starts as NaN, and so does every
    output of the compiled extension (its `poison_outputs` hook), so a kernel output element that is never written
    fails the test instead of passing on leftover memory."""
    empty, empty_like = torch.empty, torch.empty_like
    extension = _extension_ops()

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = lambda *a, **k: fill(empty(*a, **k))
    torch.empty_like = lambda *a, **k: fill(empty_like(*a, **k))
    if extension is not None:
        extension.poison_outputs(True)
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like
        if extension is not None:
            extension.poison_outputs(False)


def _extension_ops():
    """torch.ops.olmo_fast_C where the extension is built, else None."""
    try:
        from olmo_fast import _C  # noqa: F401
    except ImportError:
        return None
    return torch.ops.olmo_fast_C


def rounding_atol(dtype: torch.dtype) -> float:
    """flash-attention's absolute slack: twice `dtype`'s rounding error at 0.3."""
    x = torch.tensor(0.3, dtype=torch.float64)
    return 2 * (x.to(dtype).double() - x).abs().item()


def assert_within_2x(name: str, got: torch.Tensor, same: torch.Tensor, ref: torch.Tensor) -> None:
    """flash-attention's rule: max |got - ref| <= 2 * max |same - ref| + atol, and no NaN, where `ref` is the
    float64 reference, `same` plain PyTorch run in `got`'s dtype, and atol = rounding_atol(dtype), at least 4
    fp32 epsilons (fp32 results differ from PyTorch's in the last bits: summation order, fused multiply-adds),
    scaled by ref's largest magnitude when above 1 (sums over rows, e.g. weight gradients, are not O(1))."""
    assert got.shape == same.shape and got.dtype == same.dtype, \
        f"{name}: {got.shape}/{got.dtype} vs {same.shape}/{same.dtype}"
    assert not got.isnan().any(), f"{name} has NaN"
    err, base = (got.double() - ref).abs().max().item(), (same.double() - ref).abs().max().item()
    atol = max(rounding_atol(got.dtype), 4 * torch.finfo(torch.float32).eps) * max(1.0, ref.abs().max().item())
    assert err <= 2 * base + atol, \
        f"{name}: kernel error {err:.3g} > 2 x torch {got.dtype} error {base:.3g} + {atol:.2g}"


def attention_error_scales(q, k, v, dout, visible, scale, clip=None):
    """float64 per-element scales of the rounding error of attention's out, dq, dk, dv: each output's terms summed
    in absolute value (|P| |V| for out, P^T |dO| for dv, |dS| |K| and |dS|^T |Q| for dq, dk with
    |dS| = P (|dO| |V|^T + |dO| . |O|)), P weighted by 1 + |scale q . k| (the logits' own rounding moves P).
    A bound c * eps * scale then holds on any CPU (it does not depend on the summation order) and does not vanish
    where a gradient's exact value is ~0 but its terms are not. Layout [B, T, H, D]; k/v may have fewer heads;
    `visible` [B or 1, Tq, Tk] bool: which keys each query sees."""
    q, k, v, dout = (t.detach().double() for t in (q, k, v, dout))
    if clip is not None:
        q, k, v = (t.clamp(-clip, clip) for t in (q, k, v))
    group = q.shape[2] // k.shape[2]
    q, k, v, dout = (t.transpose(1, 2) for t in (q, k, v, dout))  # [B, H, T, D]
    k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
    logits = scale * q @ k.transpose(-1, -2)
    mask = visible[:, None]
    p = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    w = p * (1 + logits.abs())
    out = p @ v
    ds = w * (dout.abs() @ v.abs().transpose(-1, -2) + (dout.abs() * out.abs()).sum(-1, keepdim=True))
    mags = (w @ v.abs(), scale * ds @ k.abs(), scale * ds.transpose(-1, -2) @ q.abs(),
            w.transpose(-1, -2) @ dout.abs())
    B, H, Tk, D = mags[2].shape

    def kv_heads(t):  # gradients of a kv head sum over its group of query heads
        return t.view(B, H // group, group, Tk, D).sum(2)

    out_mag, dq_mag, dk_mag, dv_mag = mags[0], mags[1], kv_heads(mags[2]), kv_heads(mags[3])
    return tuple(t.transpose(1, 2) for t in (out_mag, dq_mag, dk_mag, dv_mag))


def dot_eps(dtype: torch.dtype) -> float:
    """Relative precision of the attention kernels' products for inputs of `dtype` here: tf32's 2^-10 for fp32
    where they run in tf32 (NVIDIA GPUs), else the dtype's eps."""
    from olmo_fast.kernels.attention import dot_precision

    return 2.0 ** -10 if dot_precision(dtype) == "tf32" else torch.finfo(dtype).eps
