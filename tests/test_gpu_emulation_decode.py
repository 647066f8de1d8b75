"""The CUDA/HIP decode-attention kernel (csrc/kernels/decode_attention.cu: split-K over the cache, then the splits
merged) run on the CPU under the emulation of csrc/emulation/emulated_gpu.h for a warp of 32 and one of 64, through
its C ABI (csrc/include/olmo_fast/kernels.h) with ctypes, against float64 PyTorch (`ops.reference.decode_attention`)
by the suite's rule (`conftest.assert_within_2x`: at most 2x plain PyTorch's error in the same dtype).

Outputs and the split workspace start as NaN; cache slots past each sequence's length, and with a window those before
the first key any query sees, hold NaN, so a kernel that read them would give NaN. The launcher's split count (real
policy: ~2 blocks per SM, >= 256 keys per split) is read back from its workspace size and checked, so that the
multi-split path (partials + merge kernel) and the single-split path (the block writes out) both run.
"""
from __future__ import annotations

import ctypes

import pytest
import torch
from conftest import assert_within_2x
from emulated_gpu import DTYPE_CODES, DTYPES, f32, i32, i64, ptr
from emulated_gpu import launch as _launch
from emulated_gpu import nan as _nan
from emulated_gpu import p as _p
from emulated_gpu import struct as _struct

from olmo_fast.ops import reference

# kernels.h's olmo_fast_decode_attention_args, field for field.
DecodeAttention = _struct("DecodeAttention", [
    ("dtype", i32), ("batch", i64), ("q_len", i64), ("heads", i64), ("kv_heads", i64), ("head_dim", i64),
    ("slots", i64), ("q", ptr), ("q_strides", i64 * 3), ("k", ptr), ("k_strides", i64 * 3), ("v", ptr),
    ("v_strides", i64 * 3), ("seqlens", ptr), ("out", ptr), ("scale", f32), ("window", i64), ("workspace", ptr),
    ("multiprocessors", i64)])
H100_SMS = 132


def _workspace_floats(gpu: ctypes.CDLL, args: ctypes.Structure) -> int:
    fn = gpu.olmo_fast_decode_attention_workspace_floats
    fn.argtypes, fn.restype = [ctypes.c_void_p], ctypes.c_int64
    return fn(ctypes.addressof(args))


def decode_inputs(B: int, Tq: int, H: int, Hkv: int, S: int, D: int, window: int | None, pad: int,
                  dtype: torch.dtype, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """q [B, Tq, H, D] (strided heads), caches k, v [B, S, Hkv, D] sliced from larger ones (extra slots, heads and,
    with pad, head-dim columns: rows that leave 16-byte vectors for scalar loads), ragged seqlens in [Tq, S] (the
    first S, the last Tq), NaN in every slot a kernel must not read (past seqlens; with a window, before the first
    key any query sees), and the caches without the NaN for the references (a masked softmax still multiplies
    masked slots by 0). Returns q, k, v, seqlens, clean_k, clean_v."""
    q = torch.randn(B, Tq, H + 2, D, device=device).to(dtype)[:, :, 1:-1]
    k, v = (torch.randn(B, S + 3, Hkv + 1, D + pad, device=device).to(dtype)[:, :S, 1:, :D] for _ in range(2))
    seqlens = torch.randint(Tq, S + 1, (B,), device=device)
    seqlens[0] = S
    if B > 1:
        seqlens[-1] = Tq
    clean_k, clean_v = k.clone(), v.clone()
    slot = torch.arange(S, device=device)[None, :]
    unread = slot >= seqlens[:, None]
    if window is not None:
        unread |= slot < (seqlens - Tq - window + 1)[:, None]
    k[unread], v[unread] = float("nan"), float("nan")
    return q, k, v, seqlens, clean_k, clean_v


def _run(gpu, q, k, v, seqlens, scale, window, multiprocessors=H100_SMS) -> tuple[torch.Tensor, int]:
    """The kernel's output (poisoned first) and the number of splits its launcher chose for a device of
    `multiprocessors`."""
    B, Tq, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    out = _nan(B, Tq, H, D, dtype=q.dtype)
    args = DecodeAttention(DTYPE_CODES[q.dtype], B, Tq, H, Hkv, D, S, _p(q), (i64 * 3)(*q.stride()[:3]), _p(k),
                           (i64 * 3)(*k.stride()[:3]), _p(v), (i64 * 3)(*v.stride()[:3]), _p(seqlens), _p(out),
                           scale, window or 0, None, multiprocessors)
    floats = _workspace_floats(gpu, args)
    workspace = _nan(floats, dtype=torch.float32) if floats else None
    args.workspace = _p(workspace)
    _launch(gpu, "decode_attention", args)
    return out, floats // (B * H * Tq * (D + 2)) if floats else 1


# (B, Tq, H, Hkv, S, D, window, pad, splits): GQA with 3 new tokens (2 x 3 rows: two row chunks) over 2 splits,
# ragged seqlens (the full cache, and only the new tokens); MHA, one token, a batch of one, head dim 40 with
# unaligned rows (scalar loads), 3 splits; a sliding window spanning 2 splits; a short window in one split (no
# workspace: the split block writes out); head dim 256 (fp32: two 16-byte vectors a lane of a warp of 32).
CASES = [
    (2, 3, 4, 2, 520, 64, None, 0, 2),
    (1, 1, 2, 2, 770, 40, None, 1, 3),
    (2, 3, 2, 1, 900, 80, 520, 0, 2),
    (2, 1, 4, 4, 300, 80, 50, 1, 1),
    (1, 2, 2, 1, 100, 256, None, 0, 1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-Tq{}-H{}-Hkv{}-S{}-D{}-window{}-pad{}-splits{}".format(*c))
def test_decode_attention(gpu, dtype, case):
    B, Tq, H, Hkv, S, D, window, pad, splits = case
    q, k, v, seqlens, clean_k, clean_v = decode_inputs(B, Tq, H, Hkv, S, D, window, pad, dtype)
    scale = 0.7 / D ** 0.5

    assert not k.is_contiguous()
    out, chosen = _run(gpu, q, k, v, seqlens, scale, window)
    assert chosen == splits, f"the launcher chose {chosen} splits, the case is meant for {splits}"
    same = reference.decode_attention(q, clean_k, clean_v, seqlens, scale, window)
    ref = reference.decode_attention(q.double(), clean_k.double(), clean_v.double(), seqlens, scale, window)
    assert_within_2x("out", out, same, ref)


def test_splits_follow_the_multiprocessor_count(gpu):
    """~2 blocks per multiprocessor: 2 (sequence, kv head) blocks over 2048 keys take 1 split on 1 multiprocessor,
    3 on 3, and on 132 the 132 wanted are capped at 8 (>= 256 keys each); no multiprocessor count is refused, not
    guessed."""
    q, k, v, seqlens, clean_k, clean_v = decode_inputs(1, 1, 2, 2, 2048, 64, None, 0, torch.float32)
    scale = 64 ** -0.5
    ref = reference.decode_attention(q.double(), clean_k.double(), clean_v.double(), seqlens, scale, None)
    same = reference.decode_attention(q, clean_k, clean_v, seqlens, scale, None)
    for sms, splits in ((1, 1), (3, 3), (132, 8)):
        out, chosen = _run(gpu, q, k, v, seqlens, scale, None, multiprocessors=sms)
        assert chosen == splits, f"{sms} multiprocessors: {chosen} splits, expected {splits}"
        assert_within_2x(f"out ({sms} multiprocessors)", out, same, ref)
    with pytest.raises(AssertionError, match="launch failed"):
        _run(gpu, q, k, v, seqlens, scale, None, multiprocessors=0)
    gpu.olmo_fast_gpu_multiprocessors.restype = ctypes.c_int
    assert gpu.olmo_fast_gpu_multiprocessors() == H100_SMS  # the emulated device the binding would ask


def test_query_without_keys_gets_zero(gpu):
    """seqlens < q_len: the first new tokens sit before the cache's start and see no key (0, not NaN)."""
    B, Tq, H, Hkv, S, D = 1, 3, 2, 1, 4, 32
    q = torch.randn(B, Tq, H, D)
    k, v = torch.randn(B, S, Hkv, D), torch.randn(B, S, Hkv, D)
    seqlens = torch.tensor([2])  # query i at position i - 1: query 0 sees nothing, 1 key 0, 2 keys 0..1
    out, _ = _run(gpu, q, k, v, seqlens, D ** -0.5, None)
    assert (out[:, 0] == 0).all()
    ref = reference.decode_attention(q[:, 1:].double(), k[:, :2].double(), v[:, :2].double(), seqlens, None, None)
    same = reference.decode_attention(q[:, 1:], k[:, :2], v[:, :2], seqlens, None, None)
    assert_within_2x("out", out[:, 1:], same, ref)
