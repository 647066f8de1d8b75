"""AdamW with OLMo's parameter groups: Linear weights decay; embeddings, norms and biases only when asked.

Parameters stay fp32 (the master weights; bf16 exists only inside autocast or FSDP's compute copies), and so do
the optimizer moments.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import OptimizerConfig


def param_groups(model: nn.Module, config: OptimizerConfig) -> list[dict]:
    """[decay group, no-decay group] (empty ones dropped), parameter names sorted as OLMo sorts them."""
    decay: dict[str, nn.Parameter] = {}
    no_decay: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{module_name}.{name}" if module_name else name
            if isinstance(module, nn.Linear) and name == "weight":
                wants_decay = True
            elif isinstance(module, nn.Embedding):
                wants_decay = config.decay_embeddings
            else:  # biases and norm weights (the OLMo models here have none)
                wants_decay = config.decay_norm_and_bias
            (decay if wants_decay else no_decay)[full] = param
    groups = []
    for params, wd in ((decay, config.weight_decay), (no_decay, 0.0)):
        if params:
            names = sorted(params)
            groups.append({"params": [params[n] for n in names], "param_names": names, "weight_decay": wd})
    return groups


def build_optimizer(model: nn.Module, config: OptimizerConfig, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, config), lr=config.learning_rate, betas=tuple(config.betas),
                             eps=config.eps, weight_decay=config.weight_decay,
                             fused=device.type == "cuda" or None)
