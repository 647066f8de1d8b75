"""Shared test setup. Without a GPU the Triton kernels run under the interpreter (TRITON_INTERPRET=1),
which must be set before Triton is first imported."""
import os

import pytest
import torch

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
