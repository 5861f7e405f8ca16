"""LR schedules: linear warmup, then one of torch's schedulers, stepped once per optimizer step.

Epoch-denominated settings are converted to steps with `steps_per_epoch`, so a
schedule means the same thing at any batch size or worker count. `plateau`
is the exception: torch's ReduceLROnPlateau is stepped once per epoch with
val_loss (after warmup finishes).
"""

from __future__ import annotations

import torch
from torch.optim import lr_scheduler as sched


class Schedule:
    """The per-step scheduler plus, for plateau, the per-epoch one."""

    def __init__(self, per_step: sched.LRScheduler, plateau: sched.ReduceLROnPlateau | None):
        self.per_step, self.plateau = per_step, plateau

    def step(self) -> None:
        self.per_step.step()

    def epoch_end(self, val_loss: float, warmup_done: bool) -> None:
        if self.plateau is not None and warmup_done:
            self.plateau.step(val_loss)

    def state_dict(self) -> dict:
        return {"per_step": self.per_step.state_dict(), "plateau": self.plateau.state_dict() if self.plateau else None}

    def load_state_dict(self, sd: dict) -> None:
        self.per_step.load_state_dict(sd["per_step"])
        if self.plateau is not None and sd.get("plateau"):
            self.plateau.load_state_dict(sd["plateau"])


def build_schedule(optimizer: torch.optim.Optimizer, spec, steps_per_epoch: int, epochs: int) -> Schedule:
    total = max(1, steps_per_epoch * epochs)
    warmup = int(round(spec.warmup * steps_per_epoch))
    after = max(1, total - warmup)
    kind = spec.kind
    if kind == "one_cycle":
        max_lrs = [g["lr"] for g in optimizer.param_groups]
        return Schedule(sched.OneCycleLR(optimizer, max_lr=max_lrs, total_steps=total), None)
    if kind in ("constant", "plateau"):
        main = sched.ConstantLR(optimizer, factor=1.0, total_iters=0)
    elif kind == "step":
        main = sched.StepLR(optimizer, step_size=spec.step_epochs * steps_per_epoch, gamma=spec.gamma)
    elif kind == "exponential":
        main = sched.ExponentialLR(optimizer, gamma=spec.gamma ** (1.0 / steps_per_epoch))
    elif kind == "cosine":
        eta_min = optimizer.param_groups[0]["lr"] * spec.min_lr_ratio
        main = sched.CosineAnnealingLR(optimizer, T_max=after, eta_min=eta_min)
    elif kind == "cyclic":
        peak = [g["lr"] for g in optimizer.param_groups]
        half = max(1, int(spec.cycle_epochs * steps_per_epoch / 2))
        main = sched.CyclicLR(optimizer, base_lr=[lr * spec.base_lr_ratio for lr in peak], max_lr=peak,
                              step_size_up=half, cycle_momentum=False)
    else:
        raise ValueError(f"unknown schedule {kind!r}")
    plateau = (sched.ReduceLROnPlateau(optimizer, mode="min", factor=spec.plateau_factor, patience=spec.plateau_patience)
               if kind == "plateau" else None)
    if warmup == 0:
        return Schedule(main, plateau)
    warm = sched.LinearLR(optimizer, start_factor=spec.warmup_start_factor, end_factor=1.0, total_iters=warmup)
    return Schedule(sched.SequentialLR(optimizer, [warm, main], milestones=[warmup]), plateau)


def lr_curve(spec, base_lr: float = 1.0, steps_per_epoch: int = 10, epochs: int = 10) -> list[float]:
    """The LR at every step of a run, for tests and plots."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base_lr)
    schedule = build_schedule(opt, spec, steps_per_epoch, epochs)
    lrs = []
    for _ in range(steps_per_epoch * epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    return lrs
