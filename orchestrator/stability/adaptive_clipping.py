"""Adaptive clipping rules, as plain functions on gradient lists.

AGC (Brock et al., 2021, NFNets): clip each unit's gradient to lambda times its
weight norm, so no unit moves by more than a fixed fraction per step. Units
are output rows/filters; vectors (biases, gains) are one unit. The weight norm
has a floor eps so zero-initialised weights can still move. The final
classifier is excluded (the caller passes the parameters to clip).

Z-score clipping: keep an EMA of the global norm's mean and variance; a step
whose norm exceeds mean + z*std is scaled down to that bound. Everything stays
on the device: no host sync.
"""

from __future__ import annotations

from typing import Optional

import torch


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm per output unit (dim 0) for matrices/kernels; the whole tensor for vectors and scalars."""
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True)


@torch.no_grad()
def agc_clip_(params: list[torch.nn.Parameter], clipping: float = 0.01, eps: float = 1e-3) -> None:
    for p in params:
        if p.grad is None:
            continue
        max_norm = unitwise_norm(p.detach()).clamp_min(eps) * clipping
        g_norm = unitwise_norm(p.grad)
        scale = torch.where(g_norm > max_norm, max_norm / g_norm.clamp_min(1e-6), torch.ones_like(g_norm))
        p.grad.mul_(scale)


@torch.no_grad()
def zscore_clip_(params: list[torch.nn.Parameter], norm: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, *,
                 z: float = 3.0, beta: float = 0.98, fallback_max_norm: Optional[float] = None) -> torch.Tensor:
    """Clip to mean + z*std of past norms (or to fallback_max_norm while warming up); update the EMA
    in place with the clipped norm (a spike must not teach the EMA that spikes are normal).
    Returns the bound used."""
    if fallback_max_norm is not None:
        bound = torch.full_like(norm, fallback_max_norm)
    else:
        bound = mean + z * var.clamp_min(0).sqrt()
    finite = torch.isfinite(norm)
    coef = torch.where(finite & (norm > bound), bound / norm.clamp_min(1e-6), torch.ones_like(norm))
    torch._foreach_mul_([p.grad for p in params if p.grad is not None], coef)
    observed = norm if fallback_max_norm is not None else torch.minimum(norm, bound)  # warm-up: learn raw norms
    clipped = torch.where(finite, observed, mean)
    first = (mean == 0) & (var == 0)
    delta = clipped - mean
    new_mean = torch.where(first, clipped, mean + (1 - beta) * delta)
    new_var = torch.where(first, torch.zeros_like(var), beta * (var + (1 - beta) * delta * delta))
    mean.copy_(new_mean)
    var.copy_(new_var)
    return bound
