"""`olmo_fast.patch` / `olmo_fast.unpatch`: olmo_fast's fused ops inside transformers' models.

`apply.py` holds `patch`, `unpatch` and the per-family table of what gets replaced; `forwards.py` holds the
replacement forwards themselves.
"""
from .apply import SUPPORTED, TABLE, PatchRecord, patch, unpatch

__all__ = ["patch", "unpatch", "PatchRecord", "TABLE", "SUPPORTED"]
