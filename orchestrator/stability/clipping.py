"""Synchronized gradient clipping.

Runs after DDP's all-reduce (and after AMP unscale), so every rank holds the
same gradients and computes the same global norm: the clip agrees across ranks
by construction, with no extra communication. The pre-clip global L2 norm is
always measured, also with mode 'value' or 'none', because it is the single
best early signal of instability.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch.nn.utils import clip_grad_value_, clip_grads_with_norm_, get_total_norm


def clip_gradients(parameters: Iterable[torch.nn.Parameter], mode: str = "norm", max_norm: float = 1.0,
                   max_value: float = 1.0) -> torch.Tensor:
    """Clip in place; return the pre-clip global L2 norm as a 0-d tensor (no host sync)."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    grads = [p.grad for p in params]
    norm = get_total_norm(grads, norm_type=2.0)
    if mode == "norm":
        clip_grads_with_norm_(params, max_norm, norm)
    elif mode == "value":
        clip_grad_value_(params, max_value)
    elif mode != "none":
        raise ValueError(f"unknown clip mode {mode!r}")
    return norm


class GradClipper:
    """Safeguard: clips at `after_backward`, records the pre-clip norm on the step state."""

    def __init__(self, mode: str = "norm", max_norm: float = 1.0, max_value: float = 1.0):
        self.mode, self.max_norm, self.max_value = mode, max_norm, max_value

    def after_backward(self, state) -> None:
        if state.scaler is not None:
            state.scaler.unscale_(state.optimizer)  # clip true gradients, not loss-scaled ones
        state.grad_norm = clip_gradients(state.model.parameters(), self.mode, self.max_norm, self.max_value)
