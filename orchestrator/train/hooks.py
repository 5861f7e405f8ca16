"""Where safeguards act in the per-worker loop (orchestrator/train/loop.py).

    setup: model -> synchronized BN -> DDP, optimizer, schedule, safeguards, resume
    for epoch:
        for batch:
            -- on_batch(state, batch) -> batch    FaultInjector; BadBatches drops the ones rejected before a resume;
                                                  NonFiniteGuard: input-scale flag;
                                                  SpikeGuard drops batches after a rollback; then BN buffers saved
            forward, loss (+ L1/L2 penalty)
            backward                              DDP all-reduces gradients here
            clip                                  GradClipper, called by name: AMP unscale, norms, clip
                                                  (norm/value/AGC/z-score)
            -- after_backward(state)              Diagnostics: per-layer norms (sampled)
            agree: ONE all-reduce of [loss*n, n, non-finite, grad norm, input outlier]   (the step's only host sync)
            -- before_step(state)                 NonFiniteGuard: skip / diverged; SpikeGuard: skip, rollback,
                                                  reduce LR, or diverged; FaultInjector: LR spike
            (Safeguards.decide: a skipped step's BN running statistics are put back)
            optimizer step (at lr x state.lr_scale) and LR schedule step, or skip
            -- after_step(state)                  BadBatches: remember a rejected batch;
                                                  Diagnostics: update ratios, where trouble started
        validate (sums all-reduced, so every rank sees the same metrics)
        -- on_epoch_end(state, metrics)           EarlyStopping (agreed), ReplicaCheck
        -- on_report(metrics)                     counters into the epoch report
        ray.train.report(metrics, checkpoint)     a barrier across ranks

Rules: a hook may only change control flow (`state.skip`, `state.stop_reason`)
from values that are identical on every rank (all-reduced ones), or after
agreeing with `agree_any`; otherwise one rank steps alone and DDP hangs.
A safeguard is any object with some of these methods; `state_dict` /
`load_state_dict`, if present, put it in checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from orchestrator.models import unwrap
from orchestrator.stability.snapshots import float_buffer_slots, restore_buffers, snapshot_buffers
from orchestrator.stability.stop import StopReason

HOOKS = ("on_batch", "after_backward", "before_step", "after_step", "on_epoch_end", "on_report")
HOOK_PREFIXES = ("on_", "after_", "before_")


@dataclass
class StepState:
    """What the loop shares with safeguards; reset per step where noted. Its trainable part (model,
    optimizer, schedule, AMP scaler) is the one training state that checkpoints, rollback snapshots and
    curriculum scoring save and load (`training_state` / `load_training_state`)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    rank: int = 0
    scaler: Optional[torch.amp.GradScaler] = None
    schedule: Any = None                 # train/schedules.Schedule (per-step scheduler, optional plateau)
    epoch: int = 0
    step: int = 0                        # global optimizer steps attempted (skipped ones count)
    loss: Optional[torch.Tensor] = None  # this rank's loss (per step)
    grad_norm: Optional[torch.Tensor] = None  # pre-clip global norm (per step)
    param_grad_norms: Optional[list] = None   # pre-clip per-tensor norms (per step; diagnostics)
    grad_norm_value: float = float("nan")  # the same, as a float after the step's one host sync
    global_loss: float = float("nan")    # all-reduced mean loss (per step)
    global_loss_typical: float = float("nan")  # the same without each rank's worst sample: what spikes are judged on
    global_nonfinite: float = 0.0        # ranks that saw NaN/Inf (per step)
    batch_outlier: Any = None            # this rank's input batch is far out of scale (a tensor flag, no sync)
    global_outlier: float = 0.0          # ranks whose batch was such an outlier (per step)
    skip: bool = False                   # skip this optimizer step (per step)
    lr_scale: float = 1.0                # multiplier on the scheduled LR for this step (recoveries, faults)
    want_post_clip_norm: bool = False    # set by the loop on logged steps: measure the norm after clipping too
    post_clip_norm: Optional[torch.Tensor] = None
    stop_reason: Optional[StopReason] = None  # set -> the run stops after this epoch's report
    events: list[dict] = field(default_factory=list)  # guard events (step, trigger, value, action)
    buffers_before: Optional[torch.Tensor] = None  # float buffers (BN running stats) before this step's forward, flat

    def begin_step(self) -> None:
        self.loss = self.grad_norm = self.param_grad_norms = self.post_clip_norm = None
        self.lr_scale = 1.0
        self.global_loss, self.global_loss_typical, self.grad_norm_value = float("nan"), float("nan"), float("nan")
        self.global_nonfinite, self.skip = 0.0, False
        self.batch_outlier, self.global_outlier = None, 0.0

    def training_state(self) -> dict:
        """Model (unwrapped from DDP), optimizer, schedule and scaler state: live references, not copies."""
        return {"model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict() if self.schedule is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_training_state(self, saved: dict) -> None:
        unwrap(self.model).load_state_dict(saved["model"])  # copies into the live tensors DDP already tracks
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.schedule is not None and saved.get("schedule") is not None:
            self.schedule.load_state_dict(saved["schedule"])
        if self.scaler is not None and saved.get("scaler") is not None:
            self.scaler.load_state_dict(saved["scaler"])


class Safeguards:
    """Calls each hook on every safeguard that has it, in the order given."""

    def __init__(self, guards: list[Any]):
        for g in guards:  # a misspelt hook would silently never run: refuse it when the safeguard is installed
            for name in dir(g):
                if name.startswith(HOOK_PREFIXES) and callable(getattr(g, name)) and name not in HOOKS:
                    raise ValueError(f"{type(g).__name__}.{name} is not a hook (hooks: {', '.join(HOOKS)})")
        self.guards = guards
        self._slots: tuple[Any, list] | None = None  # (model, where its float buffers live): see buffers()

    def buffers(self, model: torch.nn.Module) -> list[torch.Tensor]:
        """The model's float buffers (BN running statistics). Where they live, (module, name), is listed once
        per model: walking the module tree before every step cost ~25 us on the main job's 29-module ResNet
        (timeit), more on deeper nets. The tensors are read from their modules each step: a user's layer
        may replace a buffer (`self.ema = 0.9 * self.ema + ...`), and a skipped step must restore the new one."""
        if self._slots is None or self._slots[0] is not model:
            self._slots = (model, float_buffer_slots(model))
        return [module._buffers[name] for module, name in self._slots[1]]

    def on_batch(self, state: StepState, batch: dict) -> Optional[dict]:
        """None means: every rank drops this batch (a decision made from rank-identical state)."""
        for g in self.guards:
            if batch is None:
                return None
            if hasattr(g, "on_batch"):
                batch = g.on_batch(state, batch)
        if batch is not None:
            state.buffers_before = snapshot_buffers(state.model, self.buffers(state.model))
        return batch

    def decide(self, state: StepState) -> None:
        """The before_step hooks, then: a step any guard skipped leaves no trace in the BN running
        statistics its forward wrote (a rollback empties `buffers_before`: it restored older ones)."""
        self.call("before_step", state)
        if state.skip and state.buffers_before is not None:
            restore_buffers(state.model, state.buffers_before, self.buffers(state.model))

    def find(self, kind: type) -> Any:
        return next((g for g in self.guards if isinstance(g, kind)), None)

    def call(self, hook: str, *args) -> None:
        if hook not in HOOKS:
            raise ValueError(f"{hook} is not a hook (hooks: {', '.join(HOOKS)})")
        for g in self.guards:
            fn = getattr(g, hook, None)
            if fn is not None:
                fn(*args)

    def state_dict(self) -> dict:
        return {type(g).__name__: g.state_dict() for g in self.guards if hasattr(g, "state_dict")}

    def load_state_dict(self, sd: dict) -> None:
        for g in self.guards:
            if hasattr(g, "load_state_dict") and type(g).__name__ in sd:
                g.load_state_dict(sd[type(g).__name__])
