"""Fault injection from the spec's `faults:` list, so guards can be exercised on purpose."""

from __future__ import annotations

import torch


def poison_batch(x: torch.Tensor) -> torch.Tensor:
    """Plain-function twin: the same batch, all NaN."""
    return torch.full_like(x, float("nan"))


class FaultInjector:
    def __init__(self, faults: list, features: str):
        self.faults, self.features = faults, features

    def on_batch(self, state, batch: dict) -> dict:
        for fault in self.faults:
            if fault.at_step <= state.step < fault.at_step + fault.repeat and fault.rank == state.rank and fault.kind == "nan_batch":
                batch = dict(batch)
                batch[self.features] = poison_batch(batch[self.features].float())
                state.events.append({"step": state.step, "trigger": "fault", "action": "nan_batch", "value": fault.rank})
        return batch
