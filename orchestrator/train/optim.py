"""Optimizer with decay/no-decay parameter groups, and L1/L2 loss penalties.

Norm-layer weights and biases are exempt from weight decay and penalties by
default: decaying BN gammas toward zero fights the normalisation and only
hurts (Goyal et al., "Bag of Tricks").
"""

from __future__ import annotations

import math

import torch
from torch import nn

from orchestrator.models.init import NORM_LAYERS as _NORM_TYPES


def split_decay_parameters(model: nn.Module, exclude_norm_and_bias: bool = True) -> tuple[list, list]:
    """(parameters that decay, parameters that do not)."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            exempt = exclude_norm_and_bias and (isinstance(module, _NORM_TYPES) or name == "bias")
            (no_decay if exempt else decay).append(p)
    return decay, no_decay


def scaled_lr(lr: float, rule: str, world_size: int) -> float:
    return lr * {"none": 1.0, "linear": world_size, "sqrt": math.sqrt(world_size)}[rule]


def build_optimizer(model: nn.Module, opt_spec, reg_spec, world_size: int = 1,
                    lr_multipliers: dict[str, float] | None = None) -> torch.optim.Optimizer:
    """The optimizer over `parameter_groups`."""
    groups = parameter_groups(model, opt_spec, reg_spec, world_size, lr_multipliers)
    lr = scaled_lr(opt_spec.lr, opt_spec.scale_lr, world_size)
    if opt_spec.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=opt_spec.momentum, nesterov=opt_spec.nesterov and opt_spec.momentum > 0)
    if opt_spec.name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=opt_spec.betas, eps=opt_spec.eps)
    if opt_spec.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=opt_spec.betas, eps=opt_spec.eps)
    if opt_spec.name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, momentum=opt_spec.momentum, eps=opt_spec.eps)
    raise ValueError(f"unknown optimizer {opt_spec.name!r}")


def parameter_groups(model: nn.Module, opt_spec, reg_spec, world_size: int = 1,
                     lr_multipliers: dict[str, float] | None = None) -> list[dict]:
    """Decay and no-decay groups; with lr_multipliers (name prefix -> factor, fine-tuning) each of those is
    split further by factor, and a group's lr is the scaled base LR times its factor (schedules keep it).
    A resumed run's optimizer state must have the same groups (train/planning.py checks before Ray starts)."""
    decay, no_decay = split_decay_parameters(model, reg_spec.exclude_norm_and_bias)
    lr = scaled_lr(opt_spec.lr, opt_spec.scale_lr, world_size)
    groups = []
    for params, weight_decay in ((decay, reg_spec.weight_decay), (no_decay, 0.0)):
        for factor, members in by_lr_factor(model, params, lr_multipliers or {}).items():
            groups.append({"params": members, "weight_decay": weight_decay, **({"lr": lr * factor} if factor != 1.0 else {})})
    return groups


def by_lr_factor(model: nn.Module, params: list, multipliers: dict[str, float]) -> dict[float, list]:
    """params grouped by the multiplier of their name's longest matching prefix (1.0 without one), in order."""
    from orchestrator.models import unwrap
    from orchestrator.train.warm_start import prefix_for

    if not multipliers:
        return {1.0: params}
    names = {id(p): n for n, p in unwrap(model).named_parameters()}
    out: dict[float, list] = {1.0: []}  # the base-LR group first: the reported lr is its
    for p in params:
        prefix = prefix_for(names[id(p)], multipliers)
        out.setdefault(multipliers[prefix] if prefix else 1.0, []).append(p)
    if not out[1.0] and len(out) > 1:
        del out[1.0]
    return out


def weight_penalty(params: list[torch.Tensor], l1: float = 0.0, l2: float = 0.0) -> torch.Tensor | float:
    """l1 * sum|w| + l2/2 * sum w^2 over `params` (the decaying group); 0.0 when both are off."""
    if not params or (l1 == 0 and l2 == 0):
        return 0.0
    penalty = 0.0
    if l1:
        penalty = penalty + l1 * sum(p.abs().sum() for p in params)
    if l2:
        penalty = penalty + 0.5 * l2 * sum(p.pow(2).sum() for p in params)
    return penalty
