"""Any model folder olmo-fast reads: a training checkpoint (`stepN/`), an HF or an original OLMo directory."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def load_checkpoint(path: str | Path, dtype: torch.dtype | None = None, device: Any = None,
                    backend: str | None = None):
    """The model of a training checkpoint (its weights only; pickle-based ones refused), else
    `OLMo.from_pretrained(path)`. CheckpointError on anything else."""
    from ..model import OLMo
    from ..train import state

    folder = Path(path)
    if not (folder.is_dir() and state.is_checkpoint(folder)):
        return OLMo.from_pretrained(folder, dtype=dtype, device=device, backend=backend)
    model = OLMo(state.checkpoint_model_config(folder), backend=backend, init=False)
    state.load(folder, model, None)
    return model.to(device=device, dtype=dtype)
