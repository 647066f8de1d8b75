"""RoPE frequency scaling (OLMo 3's long-context layers): which inverse frequencies and cos/sin factor a rotary
embedding uses, from HF's `rope_parameters` / `rope_scaling` dicts.

    "default": inv_freq[i] = theta^(-2i/D), attention_factor 1
    "linear":  inv_freq / factor (positions interpolated by `factor`)
    "yarn":    per pair i, a blend of the extrapolated theta^(-2i/D) and the interpolated theta^(-2i/D) / factor,
               ramping linearly between the pairs that turn `beta_fast` and `beta_slow` times over the original
               context; cos and sin are multiplied by attention_factor (default 0.1 ln(factor) + 1)
The numbers are transformers' (`modeling_rope_utils`), which tests/test_olmo2_reference.py checks them against.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigError

ROPE_TYPES = ("default", "linear", "yarn")


@dataclass(frozen=True)
class RopeScaling:
    """One rotary embedding's frequency scaling (hashable, so kernels can cache their tables by it)."""

    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None  # yarn: the context the model was pretrained with
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None  # yarn: None derives it from factor (and mscale / mscale_all_dim)
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"RoPE type {self.rope_type!r} is not supported; olmo-fast supports "
                              f"{', '.join(ROPE_TYPES)}")
        if self.factor <= 0:
            raise ConfigError(f"RoPE scaling factor must be positive, got {self.factor}")
        if self.rope_type == "yarn" and not self.original_max_position_embeddings:
            raise ConfigError("yarn RoPE scaling needs original_max_position_embeddings")

    @classmethod
    def from_hf(cls, params: dict[str, Any] | None, max_position_embeddings: int | None = None) -> RopeScaling | None:
        """From an HF `rope_parameters` / `rope_scaling` dict (None or type "default": None). Unknown keys are
        errors, except `rope_theta` (held by the model config) and `type` (transformers' old spelling)."""
        if not params:
            return None
        params = dict(params)
        rope_type = params.pop("rope_type", params.pop("type", "default"))
        params.pop("rope_theta", None)
        if rope_type == "default":
            return None
        known = {f.name for f in dataclasses.fields(cls)} - {"rope_type"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ConfigError(f"RoPE scaling key {unknown[0]!r} is not supported (known: {sorted(known)})")
        if params.get("factor") is None and rope_type == "yarn" and max_position_embeddings:
            params["factor"] = max_position_embeddings / params["original_max_position_embeddings"]
        values = {key: value for key, value in params.items() if value is not None}
        return cls(rope_type=rope_type, **values)

    def to_hf(self, theta: float) -> dict[str, Any]:
        """The `rope_parameters` dict transformers reads."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if getattr(self, f.name) is not None and f.name != "rope_type"}
        if self.rope_type == "linear":
            values = {"factor": self.factor}
        return {"rope_type": self.rope_type, "rope_theta": theta, **values}

    def cos_sin_factor(self) -> float:
        """What cos and sin are multiplied by."""
        if self.rope_type != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return float(self.attention_factor)
        if self.mscale and self.mscale_all_dim:
            return _yarn_mscale(self.factor, self.mscale) / _yarn_mscale(self.factor, self.mscale_all_dim)
        return _yarn_mscale(self.factor, 1.0)


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None,
                     device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
                     ) -> tuple[torch.Tensor, float]:
    """`(inv_freq, attention_factor)`: the inverse frequency (fp32, or `dtype`) of each of the `head_dim / 2`
    rotation pairs, and the factor cos and sin are multiplied by."""
    wavelength = theta ** (torch.arange(0, head_dim, 2, dtype=dtype, device=device) / head_dim)
    if scaling is None or scaling.rope_type == "default":
        return 1.0 / wavelength, 1.0
    if scaling.rope_type == "linear":
        return 1.0 / wavelength / scaling.factor, 1.0
    low, high = _yarn_ramp_bounds(head_dim, theta, scaling)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    ramp = ramp.to(dtype)
    # pairs below `low` turn fast (keep their frequency: extrapolate), above `high` slow (interpolate by factor)
    inv_freq = 1.0 / (scaling.factor * wavelength) * ramp + 1.0 / wavelength * (1 - ramp)
    return inv_freq, scaling.cos_sin_factor()


def _yarn_ramp_bounds(head_dim: int, theta: float, scaling: RopeScaling) -> tuple[float, float]:
    """The pair indices where yarn's ramp starts and ends (the pairs completing `beta_fast` and `beta_slow`
    turns over the original context)."""
    context = scaling.original_max_position_embeddings

    def pair_turning(turns: float) -> float:
        return head_dim * math.log(context / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_turning(scaling.beta_fast), pair_turning(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    return low, (high + 0.001 if low == high else high)
