"""Dispatch: an op call resolves its backend once and fetches each kernel it runs once (a table lookup keyed by
kernel name, backend and device type), the preference (OLMO_FAST_BACKEND, `ops.prefer`) is read on every call,
a kernel registered later is found at once, and an explicit backend without the kernel says why."""
from __future__ import annotations

import collections
import contextlib

import pytest
import torch
from conftest import DEVICE, require_kernel_where_registered

from olmo_fast import ops
from olmo_fast.ops import dispatch


def _calls(rows=5, width=12, heads=2, dim=4):
    """op -> (its forward kernel, its backward kernel, a call on fresh inputs returning one tensor to backprop)."""
    def leaf(*shape):
        return torch.randn(*shape, device=DEVICE, requires_grad=True)

    def qkv(backend):
        q, k, v = ops.qkv_rope(leaf(1, rows, 3 * heads * dim), n_heads=heads, n_kv_heads=heads, clip=0.5,
                               backend=backend)
        return q.sum() + k.sum() + v.sum()

    return {
        "layer_norm": ("layer_norm_fwd", "layer_norm_bwd",
                       lambda b: ops.layer_norm(leaf(rows, width), residual=leaf(rows, width), backend=b)[0]),
        "rms_norm": ("norm_fwd", "norm_bwd", lambda b: ops.rms_norm(leaf(rows, width), leaf(width), backend=b)),
        "swiglu": ("swiglu_fwd", "swiglu_bwd", lambda b: ops.swiglu(leaf(rows, width), backend=b)),
        "silu_mul": ("silu_mul_fwd", "silu_mul_bwd", lambda b: ops.silu_mul(leaf(rows, width), leaf(rows, width),
                                                                            backend=b)),
        "rope": ("rope", "rope", lambda b: ops.rope(leaf(1, rows, heads, dim), leaf(1, rows, 1, dim), backend=b)[0]),
        "qkv_rope": ("qkv_rope_fwd", "qkv_rope_bwd", qkv),
        "attention": ("attention_fwd", "attention_bwd",
                      lambda b: ops.attention(leaf(1, rows, heads, 16), leaf(1, rows, 1, 16), leaf(1, rows, 1, 16),
                                              clip=0.5, backend=b)),
    }


@pytest.fixture
def counted(monkeypatch):
    """Counts `dispatch.resolve` calls (by kernel name) and `dispatch.kernel` fetches (by kernel name)."""
    counts = {"resolve": collections.Counter(), "kernel": collections.Counter()}
    for name in counts:
        original = getattr(dispatch, name)

        def counting(kernel_name, *args, _original=original, _count=counts[name]):
            _count[kernel_name] += 1
            return _original(kernel_name, *args)

        monkeypatch.setattr(dispatch, name, counting)
    return counts


@pytest.mark.parametrize("how", ["explicit", "preferred"])
@pytest.mark.parametrize("backend", ["triton", "cpp"])
@pytest.mark.parametrize("op", list(_calls()))
def test_a_call_resolves_once_and_fetches_each_kernel_once(op, backend, how, counted):
    fwd, bwd, call = _calls()[op]
    require_kernel_where_registered(fwd, backend)
    for count in counted.values():
        count.clear()  # the check above looked the kernel up
    with ops.prefer(backend) if how == "preferred" else contextlib.nullcontext():
        out = call(backend if how == "explicit" else None)
        out.sum().backward()
    assert counted["resolve"] == {fwd: 1}
    # the forward's kernel in the forward, the backward's in the backward (rope's backward is itself, inverted); the
    # "cpp" LayerNorm in eager mode is one extension op whose C++ autograd node runs the backward's kernel itself
    if op == "layer_norm" and backend == "cpp":
        assert counted["kernel"] == {"layer_norm_residual": 1}
    else:
        assert counted["kernel"] == ({fwd: 2} if fwd == bwd else {fwd: 1, bwd: 1})


def test_linear_cross_entropy_resolves_once(counted):
    x = torch.randn(7, 6, device=DEVICE, requires_grad=True)
    w = torch.randn(11, 6, device=DEVICE, requires_grad=True)
    ops.linear_cross_entropy(x, w, torch.randint(0, 11, (7,), device=DEVICE), chunk_size=3, backend="torch").backward()
    assert counted["resolve"] == {"cross_entropy_chunk": 1}
    assert counted["kernel"] == {}  # "torch": reference.cross_entropy_chunk, no table lookup at all


def test_preference_is_read_on_every_call(monkeypatch):
    require_kernel_where_registered("layer_norm_fwd", "cpp", "cpu")
    cpu = torch.device("cpu")
    monkeypatch.delenv("OLMO_FAST_BACKEND", raising=False)
    assert dispatch.resolve("layer_norm_fwd", None, cpu) == "cpp"
    monkeypatch.setenv("OLMO_FAST_BACKEND", "torch")
    assert dispatch.resolve("layer_norm_fwd", None, cpu) == "torch"
    with ops.prefer("cpp"):
        assert dispatch.resolve("layer_norm_fwd", None, cpu) == "cpp"
        # C++ attention runs on a GPU where the extension was built with CUDA/HIP kernels; else the next backend
        on_gpu = dispatch.resolve("attention_fwd", None, torch.device("cuda")) == "cpp"
        assert on_gpu == (torch.ops.olmo_fast_C.gpu_runtime() != "none")
    assert dispatch.resolve("layer_norm_fwd", None, cpu) == "torch"
    monkeypatch.setenv("OLMO_FAST_BACKEND", "fortran")
    with pytest.raises(dispatch.BackendError, match="fortran"):
        dispatch.resolve("layer_norm_fwd", None, cpu)


def test_a_kernel_registered_later_is_found(monkeypatch):
    monkeypatch.setattr(dispatch, "_KERNELS", dict(dispatch._KERNELS))
    monkeypatch.delenv("OLMO_FAST_BACKEND", raising=False)
    cpu, name = torch.device("cpu"), "test_only_kernel"
    assert dispatch.resolve(name, None, cpu) == "torch"
    with pytest.raises(dispatch.BackendError, match="test_only_kernel"):
        dispatch.resolve(name, "cpp", cpu)

    def fn(x):
        return x

    dispatch.register_kernel(name, "cpp", fn, ("cpu",))
    assert dispatch.resolve(name, None, cpu) == "cpp" and dispatch.kernel(name, "cpp", "cpu") is fn
    assert dispatch.available_backends(name, "cpu") == ["cpp", "torch"]
    with pytest.raises(dispatch.BackendError, match=r"runs on \['cpu'\], not on 'cuda'"):
        dispatch.kernel(name, "cpp", "cuda")
    assert dispatch.resolve(name, None, torch.device("cuda")) == "torch"  # registered for the CPU only


def test_eager_calls_skip_the_dispatcher_and_tracing_gets_the_registered_op(monkeypatch):
    """ops._library.custom_op: an eager call (with autograd) runs the op's body through a plain autograd.Function,
    not the torch.library op, with the op's results and gradients; fake tensors and torch.fx get the op."""
    from olmo_fast.ops import activations

    require_kernel_where_registered("swiglu_fwd", "cpp")
    op = activations._swiglu_fwd
    h = torch.randn(5, 2, 6, device=DEVICE, requires_grad=True)
    dout = torch.randn(5, 2, 3, device=DEVICE)
    via_op = op.op(h, "cpp")  # the registered op, its autograd included
    want = (via_op, *torch.autograd.grad(via_op, [h], dout))
    calls = []
    monkeypatch.setattr(op, "op", lambda *args: calls.append(args))
    got = ops.swiglu(h, backend="cpp")
    got = (got, *torch.autograd.grad(got, [h], dout))
    assert calls == [] and got[0].grad_fn is not None
    for g, w in zip(got, want):
        assert torch.equal(g, w)  # the same kernels on the same inputs
    monkeypatch.undo()

    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = ops.swiglu(torch.empty(4, 6, device=DEVICE), backend="cpp")
    assert fake.shape == (4, 3)
    graph = torch.fx.symbolic_trace(lambda x: activations._swiglu_fwd(x, "cpp")).graph
    assert torch.ops.olmo_fast.swiglu_fwd.default in {n.target for n in graph.nodes}
