"""Loss and gradient-norm spike detection, and the recoveries every rank takes together.

Detection reads only the step's all-reduced loss and the global gradient norm
(identical on every rank), so every rank reaches the same verdict with no
extra communication. The loss it judges leaves out each rank's worst sample: with tiny batches one hard
or mislabelled sample is enough for z > 6 once the loss is low, while a run that breaks raises every
sample's loss (measured, 2 samples per worker, 2 seeds: 0.982 with 17 and 11 LR cuts judging the whole
batch, 0.992 with 9 and 7 judging it without; the plain loop 0.993). Statistics are an EMA of mean and variance with a warm-up;
spikes and non-finite steps do not update them. Defaults follow published
practice: z > 6; the window is 32 steps (a longer one kept a short run's early, falling loss
in its statistics and hid a 150x loss spike at z 4.9).
A loss spike must also be material: a loss that rose above its mean by less than 5% of its chance
level is jitter, however large its z. Near zero loss the variance is tiny and z blows up on noise:
converged tabular runs at loss 1e-5 logged 2-8 spikes, one a rollback and 10 skipped batches
(measured in an ASHA sweep); the loss spikes of the stress suite's faults rose 14-45x the floor.

Recoveries (stability.spike.action):
  skip      drop this step's update
  rollback  restore the last good in-memory snapshot, then skip the next K batches; a lone loss
            spike with a calm gradient norm is only skipped until a second one within 5 steps
            confirms it
            (PaLM restarted ~100 steps before a spike and skipped 200-500 batches)
  reduce_lr multiply the LR by a factor and re-warm it linearly
Under a clip (stability.clip, on by default) a gradient-norm spike with a calm loss is let through:
the clip already bounded that update, and the norm jumps as a network learns something new (a
transformer's attention forming). A loss spike within 5 steps of it is confirmed trouble.
A level shift is not a spike: when rollbacks keep restoring calm weights that meet the spike again
at their very first step (rebaseline_after times in a row), the data changed, not the run. The
statistics restart at the new level and training goes on (a divergence from a too-high LR needs
updates to build up, so its first step after a rollback is calm).
A retry budget (max_recoveries) turns a hopeless run into a clean 'diverged' stop.
"""

from __future__ import annotations

import math
from typing import Optional

from orchestrator import metric_keys as mk
from orchestrator.stability.replica_check import replica_drift
from orchestrator.stability.snapshots import SnapshotRing, restore
from orchestrator.stability.stop import diverged


def zscore(value: float, mean: float, var: float) -> float:
    """Plain-function twin: how many standard deviations `value` lies above `mean`."""
    return (value - mean) / math.sqrt(var) if var > 0 else (0.0 if value <= mean else math.inf)


class EmaStats:
    def __init__(self, window: int):
        self.beta = 1 - 2 / (window + 1)
        self.mean, self.var, self.n = 0.0, 0.0, 0

    def update(self, x: float) -> None:
        if self.n == 0:
            self.mean = x
        else:
            delta = x - self.mean
            self.mean += (1 - self.beta) * delta
            self.var = self.beta * (self.var + (1 - self.beta) * delta * delta)
        self.n += 1


def loss_scale(chance_loss: Optional[float], first_loss: Optional[float]) -> float:
    """What "small" is measured against for a run's loss (the spike floor, the report's oscillation score): the
    chance-level loss when the loss has one (cross-entropy: ln classes), else the run's first loss. Not the
    larger of the two: a run with every weight x10 starts at a loss of 67."""
    return chance_loss or first_loss or 0.0


def material(value: float, mean: float, scale: float, min_rise: float) -> bool:
    """Plain-function twin: does `value` rise above `mean` by at least `min_rise` of the signal's `scale`?"""
    return value - mean >= min_rise * scale


class SpikeDetector:
    """Returns which signal spiked ('loss' / 'grad_norm') or None; learns only from calm steps.

    A loss spike must also be material (see the module's docstring): its rise is measured against
    `loss_scale(chance_loss, the first loss it saw)`."""

    def __init__(self, window: int = 128, z_loss: float = 6.0, z_grad: float = 6.0, warmup: int = 20,
                 min_rise: float = 0.0, chance_loss: Optional[float] = None):
        self.loss, self.grad = EmaStats(window), EmaStats(window)
        self.z_loss, self.z_grad, self.warmup = z_loss, z_grad, warmup
        self.min_rise, self.chance_loss = min_rise, chance_loss
        self.first_loss: Optional[float] = None

    def check(self, loss: float, grad_norm: float) -> tuple[Optional[str], float]:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return None, 0.0  # the non-finite guard handles these
        if self.first_loss is None:
            self.first_loss = abs(loss)
        if self.loss.n >= self.warmup:
            for name, stats, value, limit in ((mk.LOSS, self.loss, loss, self.z_loss), (mk.GRAD_NORM, self.grad, grad_norm, self.z_grad)):
                z = zscore(value, stats.mean, stats.var)
                if z > limit and (name != mk.LOSS or material(value, stats.mean, loss_scale(self.chance_loss, self.first_loss), self.min_rise)):
                    return name, z
        self.loss.update(loss)
        self.grad.update(grad_norm)
        return None, 0.0

    def rebaseline(self, loss: float, grad_norm: float) -> None:
        """A new level: the statistics restart there, keeping their relative spread (a loss that moved
        from 0.1 to 2.0 is as noisy, relative to its level, as before), and stay armed (no new warm-up)."""
        for stats, value in ((self.loss, loss), (self.grad, grad_norm)):
            relative_var = stats.var / stats.mean ** 2 if stats.mean else 0.0
            stats.mean, stats.var = value, relative_var * value * value

    def accept(self, loss: float, grad_norm: float) -> None:
        """Learn from a step that was flagged but let through (a clipped gradient-norm spike): a level
        that keeps rising, as the norm does while a transformer learns, is followed, not flagged forever."""
        self.loss.update(loss)
        self.grad.update(grad_norm)

    def observed_and_usual(self, signal: str, loss: float, grad_norm: float) -> dict:
        """The flagged signal's value beside its EMA mean: "a loss of 2.3 where 0.02 is usual" reads better than z."""
        value, stats = (loss, self.loss) if signal == mk.LOSS else (grad_norm, self.grad)
        return {"observed": float(f"{value:.4g}"), "usual": float(f"{stats.mean:.4g}")}

    def state_dict(self) -> dict:
        return {"loss": vars(self.loss).copy(), "grad": vars(self.grad).copy(),
                "first_loss": self.first_loss}

    def load_state_dict(self, sd: dict) -> None:
        vars(self.loss).update(sd["loss"])
        vars(self.grad).update(sd["grad"])
        self.first_loss = sd.get("first_loss")  # not the resumed step's: a resume must not re-scale the floor


CONFIRM_STEPS = 5  # a second loss spike this soon after a lone one confirms it


class SpikeGuard:
    def __init__(self, spec, clipped: bool = False, chance_loss: Optional[float] = None):
        self.spec = spec
        self.clipped = clipped  # stability.clip bounds every update: a gradient-norm spike cannot make a big step
        self.detector = SpikeDetector(spec.window, spec.z_loss, spec.z_grad, spec.warmup_steps, spec.min_rise, chance_loss)
        self.ring = SnapshotRing(spec.snapshots)
        self.skip_batches = 0
        self.recent: list[int] = []  # steps of the recoveries inside the budget's window
        self.lr_factor, self.rewarm_start = 1.0, None
        self.counts = {key: 0 for key in mk.SPIKE_COUNTERS}
        self.suspect_step: Optional[int] = None  # the last lone loss spike (skipped, not rolled back)
        self.clipped_step: Optional[int] = None  # the last gradient-norm spike let through (bounded by the clip)
        self.calm = False  # this step passed the detector (set in before_step, read in after_step)
        # Level shifts: a rollback restores weights that were calm. If they meet the spike again at once,
        # before a single update, the weights are not what changed; the data is.
        self.just_restored = False
        self.restored_spikes = 0  # rollbacks in a row whose first step after restoring spiked again
        self.lr_factor_before = 1.0  # the LR factor before this run of rollbacks began

    def on_batch(self, state, batch):
        if self.spec.action == "rollback" and not self.ring.ring:
            self.ring.add(state.step, state)  # where the run started: fresh init or its checkpoint
        if self.skip_batches > 0:  # after a rollback: every rank drops the same batches
            self.skip_batches -= 1
            self.counts[mk.BATCHES_SKIPPED] += 1
            return None
        return batch

    def before_step(self, state) -> None:
        self.ring.wait()  # a snapshot still being copied must be complete before this step's update
        self.calm = False
        state.lr_scale *= self.current_lr_factor(state.step)
        if state.skip:
            return
        first_after_restore, self.just_restored = self.just_restored, False
        trigger, z = self.detector.check(state.global_loss_typical, state.grad_norm_value)
        if trigger is None:
            self.calm = True
            self.restored_spikes = 0 if first_after_restore else self.restored_spikes  # the rollback cured it
            return
        seen = self.detector.observed_and_usual(trigger, state.global_loss_typical, state.grad_norm_value)
        if trigger == mk.GRAD_NORM and self.clipped and not first_after_restore and not self._near(self.suspect_step, state.step):
            # The loss is calm and the clip has already bounded this update. Rolling back such steps rolled
            # back learning itself: a transformer's gradient norm jumps as its attention forms, and 15
            # rollbacks held it at 0.59 accuracy where the plain loop reached 0.87 (measured). Let it through;
            # if it was the start of trouble, the loss says so next (a loss spike, confirmed by this one).
            self.detector.accept(state.global_loss_typical, state.grad_norm_value)
            self.clipped_step = state.step
            self.counts[mk.GRAD_NORM_JUMPS] += 1  # counted apart: the guard did nothing, so it is no spike
            state.events.append(self._event(state, "grad_norm_spike", z, seen, mk.LET_THROUGH))
            return
        self.counts[mk.SPIKES] += 1
        if first_after_restore:
            self.restored_spikes += 1
            if self.spec.rebaseline_after and self.restored_spikes >= self.spec.rebaseline_after:
                self._rebaseline(state, self._event(state, f"{trigger}_level_shift", z, seen, "rebaseline"))
                return
        state.skip = True
        if trigger == mk.LOSS and self.spec.action == "rollback" and not self._confirmed(state.step):
            # One noisy batch with a calm gradient norm is not instability (a 4-sample batch's loss is
            # heavy-tailed): drop that step only. Rolling back for each one cost a tiny-batch run 56
            # rollbacks, 30 LR cuts and 1 point of accuracy (measured). A loss spike that returns within
            # CONFIRM_STEPS, or a gradient-norm spike, is instability: roll back.
            self.suspect_step = state.step
            state.events.append(self._event(state, "loss_spike", z, seen, "skip"))
            return
        # The budget is a rate, not a lifetime count: with tiny batches a long healthy run sees scattered
        # loss "spikes" (a 4-sample batch's loss is heavy-tailed), and 11 of them over 1,400 steps
        # stopped a run at 0.98 accuracy as diverged (measured). A run that keeps spiking within one
        # statistics window is the one that is not recovering.
        self.recent = [s for s in self.recent if s > state.step - self.spec.window] + [state.step]
        event = self._event(state, f"{trigger}_spike", z, seen, self.spec.action)
        if len(self.recent) > self.spec.max_recoveries:
            event["action"] = "stop"
            state.stop_reason = diverged(f"{len(self.recent)} {trigger} spikes exceeded stability.spike.max_recoveries="
                                         f"{self.spec.max_recoveries} within {self.spec.window} steps (last at step {state.step}, z={z:.1f})")
        elif self.spec.action == "rollback":
            to_step, snap = self.ring.pick(state.step, self.spec.snapshot_every)
            restore(state, snap)
            self.just_restored = True
            if self.restored_spikes == 0:
                self.lr_factor_before = self.lr_factor
            state.buffers_before = None  # the snapshot brought its own BN statistics: keep those
            self.skip_batches = self.spec.rollback_skip_batches
            self.counts[mk.ROLLBACKS] += 1
            event.update(rollback_to=to_step, skip_batches=self.skip_batches,
                         replica_drift=replica_drift(state.model))  # every rank is here: the collective is safe
            if self.spec.cut_lr_after and len(self.recent) >= self.spec.cut_lr_after:
                # A spike that comes back after a rollback is not bad luck: the LR is too high for this
                # point of the run. Cut it for good (a spike the rollback cured leaves the LR alone).
                self.lr_factor *= self.spec.lr_factor
                self.counts[mk.LR_REDUCTIONS] += 1
                event.update(lr_factor=self.lr_factor)
        elif self.spec.action == "reduce_lr":
            self.lr_factor *= self.spec.lr_factor
            self.rewarm_start = state.step
            self.counts[mk.LR_REDUCTIONS] += 1
            event.update(lr_factor=self.lr_factor)
        state.events.append(event)

    def _rebaseline(self, state, event: dict) -> None:
        """Accept the new level: restart the statistics there, forget the streak's recoveries and LR cuts
        (they answered a shift, not a too-high LR), and take this step."""
        self.detector.rebaseline(state.global_loss_typical, state.grad_norm_value)
        self.recent, self.suspect_step, self.clipped_step, self.restored_spikes = [], None, None, 0
        self.lr_factor = self.lr_factor_before
        self.counts[mk.REBASELINES] += 1
        state.events.append({**event, "lr_factor": self.lr_factor})

    @staticmethod
    def _event(state, name: str, z: float, seen: dict, action: str) -> dict:
        """An entry of the report's events: the z-score, and the signal beside its usual level (`seen`)."""
        return {"step": state.step, "trigger": name, "value": round(z, 2), **seen, "action": action}

    def _confirmed(self, step: int) -> bool:
        """A loss spike soon after a lone loss spike or a let-through gradient-norm spike."""
        return self._near(self.suspect_step, step) or self._near(self.clipped_step, step)

    @staticmethod
    def _near(earlier: Optional[int], step: int) -> bool:
        return earlier is not None and 0 < step - earlier <= CONFIRM_STEPS

    def current_lr_factor(self, step: int) -> float:
        if self.rewarm_start is None:
            return self.lr_factor
        ramp = min(1.0, (step - self.rewarm_start + 1) / max(1, self.spec.rewarm_steps))
        return self.lr_factor * ramp

    def after_step(self, state) -> None:
        """After a calm step's update: every snapshot_every steps keep the state the next step starts from.
        The large copy runs in the background, overlapping the next step's forward and backward (measured in
        benchmarks/snapshot_cost.py); the next before_step waits for it."""
        if self.spec.action == "rollback" and self.calm and (state.step + 1) % self.spec.snapshot_every == 0:
            self.ring.add(state.step + 1, state, background=True)

    def on_report(self, metrics: dict) -> None:
        metrics.update(self.counts)

    def state_dict(self) -> dict:
        return {"detector": self.detector.state_dict(), "lr_factor": self.lr_factor, "suspect_step": self.suspect_step, "clipped_step": self.clipped_step,
                "rewarm_start": self.rewarm_start, "counts": dict(self.counts), "recent": list(self.recent),
                "skip_batches": self.skip_batches,  # a rollback's batches still to drop
                "level_shift": {"just_restored": self.just_restored, "restored_spikes": self.restored_spikes,
                                "lr_factor_before": self.lr_factor_before}}

    def load_state_dict(self, sd: dict) -> None:
        self.detector.load_state_dict(sd["detector"])
        self.lr_factor, self.rewarm_start = sd["lr_factor"], sd["rewarm_start"]
        self.counts.update(sd["counts"])
        self.recent = list(sd.get("recent", []))
        self.suspect_step, self.clipped_step = sd.get("suspect_step"), sd.get("clipped_step")
        self.skip_batches = sd.get("skip_batches", 0)
        shift = sd.get("level_shift", {})
        self.just_restored, self.restored_spikes = shift.get("just_restored", False), shift.get("restored_spikes", 0)
        self.lr_factor_before = shift.get("lr_factor_before", self.lr_factor)
