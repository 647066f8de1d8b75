"""olmo-fast: custom kernels and a lean runtime for the OLMo family of language models."""
from __future__ import annotations

from . import ops
from .config import ConfigError, ModelConfig
from .eval import evaluate
from .generation import Completion, generate
from .model import OLMo
from .patch import patch, unpatch

__version__ = "0.1.0"
__all__ = ["ModelConfig", "ConfigError", "OLMo", "ops", "generate", "Completion", "evaluate",
           "patch", "unpatch", "__version__"]
