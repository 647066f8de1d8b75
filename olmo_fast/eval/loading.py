"""Any model folder olmo-fast reads: a training checkpoint (`stepN/`), an HF or an original OLMo directory."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def load_checkpoint(path: str | Path, dtype: torch.dtype | None = None, device: Any = None,
                    backend: str | None = None, trust_pickle: bool = False):
    """The model of a training checkpoint (its weights only), else `OLMo.from_pretrained(path)`. CheckpointError
    on anything else; pickle-based files are refused unless `trust_pickle`."""
    from ..model import OLMo
    from ..train import state

    folder = Path(path)
    if not (folder.is_dir() and state.is_checkpoint(folder)):
        return OLMo.from_pretrained(folder, dtype=dtype, device=device, backend=backend, trust_pickle=trust_pickle)
    model = OLMo(state.checkpoint_model_config(folder, trust_pickle=trust_pickle), backend=backend, init=False)
    state.load(folder, model, None, trust_pickle)
    return model.to(device=device, dtype=dtype)
