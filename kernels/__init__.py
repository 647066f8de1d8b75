"""Triton kernels (installed as `olmo_fast.kernels`): one op per file, each documenting what it computes and
the bytes it moves. Host-side launch helpers live in `_launch.py`; autograd lives in `olmo_fast.ops`."""
