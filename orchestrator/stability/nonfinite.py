"""Non-finite step guard: a NaN/Inf loss or gradient on any rank skips the step on every rank.

It also skips a step whose input batch is far out of scale: mean square above `max_batch_scale_ratio`
times its running average (a corrupt batch, e.g. 1e4x or raw 0-255 pixels). BN normalises such a batch
away in training, so neither the loss nor the gradient need show it, but its forward would poison the
running statistics that evaluation uses (measured: val accuracy 0.97 -> 0.10). Only the input is
judged: after a bad *update* it is the weights that are wrong, which is the spike guard's rollback's job.

The decision reads only the step's all-reduced `nonfinite` count, so all ranks
skip together and keep identical parameters. A budget of consecutive skips
turns a run that keeps producing NaN into a clean 'diverged' stop.
"""

from __future__ import annotations

import math

import torch

from orchestrator import metric_keys as mk
from orchestrator.data.preprocess import FEATURES
from orchestrator.stability.stop import diverged


def should_skip(global_nonfinite_count: float) -> bool:
    """Plain-function twin: skip when any rank saw a non-finite loss or gradient norm."""
    return not math.isfinite(global_nonfinite_count) or global_nonfinite_count > 0


def batch_scale_outlier(power: torch.Tensor, running: torch.Tensor, ratio: float) -> torch.Tensor:
    """Plain-function twin: 1.0 when a batch's mean square exceeds `ratio` x the running one (a tensor flag)."""
    return (power > ratio * running).float()


OUTLIER_WARMUP_STEPS = 50  # steps of input statistics before a batch can be judged out of scale


class NonFiniteGuard:
    def __init__(self, max_consecutive_skips: int = 10, max_batch_scale_ratio: float = 0.0):
        self.max_consecutive_skips = max_consecutive_skips
        self.max_ratio = max_batch_scale_ratio
        self.input_power: torch.Tensor | None = None  # running mean square of the inputs (no host sync)
        self.consecutive = 0
        self.total = 0

    def on_batch(self, state, batch: dict) -> dict:
        if self.max_ratio and FEATURES in batch:
            power = batch[FEATURES].float().pow(2).mean()
            ignore = ~torch.isfinite(power)  # a NaN batch is the other check's business, and must not teach
            if self.input_power is not None and self.input_power.device != power.device:
                self.input_power = self.input_power.to(power.device)  # restored from a checkpoint, on the CPU
            if self.input_power is None:
                self.input_power = torch.where(ignore, torch.ones_like(power), power)
            elif state.step >= OUTLIER_WARMUP_STEPS:
                state.batch_outlier = batch_scale_outlier(power, self.input_power, self.max_ratio)
                ignore = ignore | (state.batch_outlier > 0)  # nor may an outlier
            power = torch.where(ignore, self.input_power, power)
            beta = 0.9 if state.step < OUTLIER_WARMUP_STEPS else 0.99
            self.input_power = beta * self.input_power + (1 - beta) * power
        return batch

    def before_step(self, state) -> None:
        outlier = state.global_outlier > 0
        if not should_skip(state.global_nonfinite) and not outlier:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        state.skip = True
        trigger = "batch_outlier" if outlier and not should_skip(state.global_nonfinite) else "nonfinite"
        state.events.append({"step": state.step, "trigger": trigger, "action": "skip",
                             "value": state.global_outlier if trigger == "batch_outlier" else state.global_nonfinite})
        if self.consecutive >= self.max_consecutive_skips:
            state.stop_reason = diverged(f"{self.consecutive} consecutive non-finite steps "
                                         f"(stability.nonfinite.max_consecutive_skips={self.max_consecutive_skips}) at step {state.step}")

    def on_report(self, metrics: dict) -> None:
        metrics[mk.SKIPPED_STEPS] = self.total

    def state_dict(self) -> dict:
        """With the running input scale: a resume that re-learned it from one batch judged every later batch
        against that one (a NaN first batch made it 1.0 and flagged unstandardised data for good)."""
        power = None if self.input_power is None else float(self.input_power)
        return {"consecutive": self.consecutive, "total": self.total, "input_power": power}

    def load_state_dict(self, sd: dict) -> None:
        self.consecutive, self.total = sd["consecutive"], sd["total"]
        power = sd.get("input_power")
        self.input_power = None if power is None else torch.tensor(power)
