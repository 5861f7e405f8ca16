"""Fault injection from the spec's `faults:` list, so every guard can be exercised on purpose.

Batch faults hit one rank (the others must notice through the all-reduced
step statistics); LR and weight faults hit every rank, as a real bad
hyper-parameter or a corrupted layer would; an input inversion is a
sustained distribution shift of training and validation data alike.
"""

from __future__ import annotations

import time

import torch

from orchestrator.models import unwrap


def poison_batch(x: torch.Tensor, kind: str = "nan_batch", factor: float = 1e6) -> torch.Tensor:
    """Plain-function twin: the same batch all NaN (nan_batch) or scaled by `factor` (huge_batch)."""
    return torch.full_like(x, float("nan")) if kind == "nan_batch" else x * factor


@torch.no_grad()
def scale_weights(model: torch.nn.Module, prefix: str, factor: float) -> list[str]:
    names = [n for n, p in unwrap(model).named_parameters() if prefix == "*" or n.startswith(prefix)]
    for n, p in unwrap(model).named_parameters():
        if n in names:
            p.mul_(factor)
    return names


class FaultInjector:
    def __init__(self, faults: list, features: str):
        self.faults, self.features = faults, features

    def _active(self, state, kinds):
        return [f for f in self.faults if f.kind in kinds and f.at_step <= state.step < f.at_step + f.repeat]

    def on_batch(self, state, batch: dict) -> dict:
        for fault in self._active(state, ("nan_batch", "huge_batch")):
            if fault.rank == state.rank:
                batch = dict(batch)
                batch[self.features] = poison_batch(batch[self.features].float(), fault.kind, fault.factor)
                state.events.append({"step": state.step, "trigger": "fault", "action": fault.kind, "value": fault.rank})
        if inverting := self._active(state, ("invert_inputs",)):  # every rank: the world changed, not one worker's data
            batch = dict(batch)
            batch[self.features] = -batch[self.features].float()
            if any(f.at_step == state.step for f in inverting):
                state.events.append({"step": state.step, "trigger": "fault", "action": "invert_inputs", "value": -1})
        for fault in self._active(state, ("hang",)):
            if fault.rank == state.rank:  # a dead peer: the others must fail fast on the collective timeout
                time.sleep(10 ** 6)
        for fault in self._active(state, ("scale_weights",)):
            if state.step == fault.at_step:  # once, on every rank: replicas stay identical
                names = scale_weights(state.model, fault.layer, fault.factor)
                state.events.append({"step": state.step, "trigger": "fault", "action": "scale_weights",
                                     "value": fault.factor, "layers": names})
        return batch

    def eval_inputs(self, state, x: torch.Tensor) -> torch.Tensor:
        """Validation sees the shifted world too, from the step the shift began: accuracy on today's data."""
        return -x if self._active(state, ("invert_inputs",)) else x

    def before_step(self, state) -> None:
        for fault in self._active(state, ("lr_spike",)):
            state.lr_scale *= fault.factor
            if state.step == fault.at_step:
                state.events.append({"step": state.step, "trigger": "fault", "action": "lr_spike", "value": fault.factor})
