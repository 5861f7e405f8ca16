"""Non-finite step guard: a NaN/Inf loss or gradient on any rank skips the step on every rank.

The decision reads only the step's all-reduced `nonfinite` count, so all ranks
skip together and keep identical parameters. A budget of consecutive skips
turns a run that keeps producing NaN into a clean 'diverged' stop.
"""

from __future__ import annotations

import math

import torch


def should_skip(global_nonfinite_count: float) -> bool:
    """Plain-function twin: skip when any rank saw a non-finite loss or gradient norm."""
    return not math.isfinite(global_nonfinite_count) or global_nonfinite_count > 0


@torch.no_grad()
def restore_buffers(state) -> None:
    """Undo what a skipped step's forward did to the BN running statistics (a NaN or a 1e4x batch would
    otherwise poison evaluation for hundreds of steps, though the update itself was dropped)."""
    live = [b for b in state.model.buffers() if b.is_floating_point()]
    for buffer, saved in zip(live, state.buffers_before):
        buffer.copy_(saved)


class NonFiniteGuard:
    def __init__(self, max_consecutive_skips: int = 10):
        self.max_consecutive_skips = max_consecutive_skips
        self.consecutive = 0
        self.total = 0

    def on_batch(self, state, batch: dict) -> dict:
        # A NaN batch poisons BN running statistics in the forward pass (on every rank, once they are
        # synchronized), so keep a copy of the buffers to put back if this step is skipped. Cheap:
        # BN buffers are two vectors per layer.
        state.buffers_before = [b.detach().clone() for b in state.model.buffers() if b.is_floating_point()]
        return batch

    def before_step(self, state) -> None:
        if not should_skip(state.global_nonfinite):
            self.consecutive = 0
            return
        restore_buffers(state)
        self.consecutive += 1
        self.total += 1
        state.skip = True
        state.events.append({"step": state.step, "trigger": "nonfinite", "action": "skip",
                             "value": state.global_nonfinite})
        if self.consecutive >= self.max_consecutive_skips:
            state.stop_reason = (f"diverged: {self.consecutive} consecutive non-finite steps "
                                 f"(stability.nonfinite.max_consecutive_skips={self.max_consecutive_skips}) at step {state.step}")

    def on_report(self, metrics: dict) -> None:
        metrics["skipped_steps"] = self.total

    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, sd: dict) -> None:
        self.consecutive, self.total = sd["consecutive"], sd["total"]
