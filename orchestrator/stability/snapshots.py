"""An in-memory ring of recent training states, to roll back to without touching disk.

A snapshot is model + optimizer + schedule (+ AMP scaler) state copied to CPU
memory. Every rank keeps its own ring; replicas are identical, so every rank
restores the same state. The ring starts with the state the run began from
(fresh init, or the on-disk checkpoint it resumed from), so there is always
somewhere to go back to.
"""

from __future__ import annotations

import copy
import threading
from collections import deque
from typing import Optional

import torch

from orchestrator.models import unwrap


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


def snapshot_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    """Copies of the float buffers (BN running statistics) before a step's forward. Cheap: two vectors
    per BN layer, on the device."""
    return [b.detach().clone() for b in model.buffers() if b.is_floating_point()]


@torch.no_grad()
def restore_buffers(model: torch.nn.Module, saved: list[torch.Tensor]) -> None:
    """Undo what a skipped step's forward did to the running statistics: a NaN or a 1e4x batch would
    otherwise poison evaluation for hundreds of steps, though its update was dropped."""
    for buffer, before in zip((b for b in model.buffers() if b.is_floating_point()), saved):
        buffer.copy_(before)


def capture(state) -> dict:
    """A CPU copy of the step state's training state (model, optimizer, schedule, scaler)."""
    return _to_cpu(state.training_state())


def restore(state, snap: dict) -> None:
    state.load_training_state(snap)


def capture_in_background(state) -> tuple[dict, threading.Thread]:
    """A snapshot whose large part (parameters and optimizer state) is copied by a thread while the next
    step's forward and backward run: they read the parameters but change neither them nor the optimizer
    state, which only the next optimizer step does, so the caller joins the thread before that. Buffers
    (BN running statistics, written by the forward), the schedule and the scaler are small and copied now."""
    live = state.training_state()
    model = live["model"]
    params = {name for name, _ in unwrap(state.model).named_parameters()}
    snap = {"model": {k: (v if k in params else _to_cpu(v)) for k, v in model.items()},
            "schedule": _to_cpu(live["schedule"]), "scaler": _to_cpu(live["scaler"]), "optimizer": live["optimizer"]}

    def copy_large() -> None:
        snap["model"] = {k: _to_cpu(v) if k in params else v for k, v in snap["model"].items()}
        snap["optimizer"] = _to_cpu(snap["optimizer"])

    thread = threading.Thread(target=copy_large, name="keel-snapshot", daemon=True)
    thread.start()
    return snap, thread


class SnapshotRing:
    def __init__(self, size: int = 3):
        self.ring: deque[tuple[int, dict]] = deque(maxlen=size)
        self.pending: Optional[threading.Thread] = None

    def add(self, step: int, state, background: bool = False) -> None:
        """Keep the state as of `step`. background=True: the large copy overlaps the next step's compute;
        `wait()` (called by `pick` and before the next optimizer step) finishes it."""
        self.wait()
        if background:
            snap, self.pending = capture_in_background(state)
        else:
            snap = capture(state)
        self.ring.append((step, snap))

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.join()
            self.pending = None

    def pick(self, before_step: int, min_age: int) -> Optional[tuple[int, dict]]:
        """The newest snapshot at least `min_age` steps before `before_step` (else the oldest);
        newer ones are dropped: they may already hold the start of the instability."""
        self.wait()
        if not self.ring:
            return None
        chosen = next((item for item in reversed(self.ring) if before_step - item[0] >= min_age), self.ring[0])
        while self.ring and self.ring[-1][0] > chosen[0]:
            self.ring.pop()
        return chosen
