"""A silent collapse: the loss climbs back to chance level after the model had learned, with no spike.

Nothing in the spike guard fires when a network forgets: the stress suite's `long_lstm` (a stacked LSTM at 3x
its tuned LR), seed 1, reaches 0.75 validation accuracy (validation loss 0.56) in epoch 1, and its training
loss dips from 0.69 (ln 2, chance for its 2 classes) to 0.48 at step 25. From step 29 the training loss is back
at 0.67-0.74, and the validation loss reads 0.68, 0.70, 0.70 for the next three epochs: 0.55 accuracy at the end.
A jump from 0.48 to 0.74 against a loss that was still falling is no 6-sigma spike, and it came inside the
guard's 50-step warm-up. Before this watch its stability report said "No guard fired". That dip was three
steps long, too short for a smoothed training loss to show, so both signals are watched: the training loss
(a 20-step EMA) and the validation loss (once per epoch, already an average over the whole split).
`CollapseWatch` only reports (the stability report's `collapse` and its summary). `CollapseRecovery` acts on
the validation loss (stability.collapse.action: rollback, the default): it puts back the best epoch's state.

Chance level is the loss of a uniform prediction, ln(num_classes), for cross-entropy with or without label
smoothing or soft (mixup) targets. Other losses have no such reference, and are not watched.
"""

from __future__ import annotations

import math
from typing import Optional

from orchestrator import metric_keys as mk
from orchestrator.stability.snapshots import capture, restore

LEARNED = 0.85  # the smoothed loss reached at most this fraction of chance level: the model had learned something
LOST = 0.9      # ... and has since given back at least this fraction of that progress
AT_CHANCE = 1.1  # a rollback only for a loss at most this times chance level: a uniform guess, not a confident wrong one


def back_to_a_uniform_guess(loss: float, best: float, chance: float) -> bool:
    """Plain-function twin of CollapseRecovery's rule: collapsed, and no higher than AT_CHANCE x chance. A loss far
    above chance is a confidently wrong model: the stress suite's `data_shift` (inputs inverted) read 5.12 against
    ln 10 = 2.30. Its old weights are no better on the new data, so putting them back would only cost the steps
    spent adapting; the report still names it."""
    return collapsed(loss, best, chance) and loss <= AT_CHANCE * chance


def collapsed(loss: float, best: float, chance: float, learned: float = LEARNED, lost: float = LOST) -> bool:
    """Plain-function twin: a (smoothed) `loss` that, after falling to `best` (at most `learned` x chance),
    has climbed back to within (1 - lost) of the way to chance level, or beyond it."""
    return best <= learned * chance and loss >= chance - (1 - lost) * (chance - best)


class CollapseWatch:
    """Follows an EMA of the training loss; remembers the first collapse and whether it lasted."""

    def __init__(self, chance: float, window: int = 20, warmup: int = 10, signal: str = "training loss"):
        """window 1 and warmup 0 follow the values as they come (the validation loss, once per epoch)."""
        self.chance, self.beta, self.warmup, self.signal = chance, 1 - 2 / (window + 1), warmup, signal
        self.ema: Optional[float] = None
        self.seen = 0
        self.best, self.best_step = math.inf, None
        self.first: Optional[dict] = None

    def observe(self, step: int, epoch: int, loss: float) -> None:
        if not math.isfinite(loss):
            return  # the non-finite guard's business
        self.ema = loss if self.ema is None else self.beta * self.ema + (1 - self.beta) * loss
        self.seen += 1
        if self.seen <= self.warmup:
            return  # the EMA still leans on its first value
        if self.ema < self.best:
            self.best, self.best_step = self.ema, step
        if self.first is None and collapsed(self.ema, self.best, self.chance):
            self.first = {"signal": self.signal, "step": step, "epoch": epoch, "loss": round(self.ema, 4),
                          "best_loss": round(self.best, 4),
                          "best_step": self.best_step, "chance_loss": round(self.chance, 4)}

    def finding(self) -> Optional[dict]:
        """The first collapse, with the smoothed loss at the end and whether it was still at chance level."""
        if self.first is None:
            return None
        return {**self.first, "final_loss": round(self.ema, 4),
                "lasted": collapsed(self.ema, self.first["best_loss"], self.chance)}

    def state_dict(self) -> dict:
        return {"ema": self.ema, "seen": self.seen, "best": self.best if math.isfinite(self.best) else None,
                "best_step": self.best_step, "first": self.first}

    def load_state_dict(self, sd: dict) -> None:
        self.ema, self.seen, self.best_step, self.first = sd["ema"], sd["seen"], sd["best_step"], sd["first"]
        self.best = math.inf if sd["best"] is None else sd["best"]


def describe(finding: dict) -> str:
    """The report's sentence for a collapse."""
    when = (f"after epoch {finding['epoch'] + 1} (step {finding['step']})" if finding["signal"] == "validation loss"
            else f"at step {finding['step']} (epoch {finding['epoch'] + 1})")
    where = (f"The {finding['signal']} went back to chance level or above ({finding['loss']:.2f}; a uniform guess scores "
             f"{finding['chance_loss']:.2f}) {when}, having fallen to {finding['best_loss']:.2f} at step {finding['best_step']}")
    if finding["lasted"]:
        return where + (f", and stayed there ({finding['final_loss']:.2f} at the end): the model does no "
                        "better than a uniform guess. Too high a learning rate, or data that changed, are the usual "
                        "causes.")
    return where + f", then recovered (loss {finding['final_loss']:.2f} at the end)."


def first_collapse(*watches: CollapseWatch) -> Optional[dict]:
    """The earliest collapse among the watches (by step), or None."""
    found = [f for f in (w.finding() for w in watches) if f is not None]
    return min(found, key=lambda f: f["step"]) if found else None


class CollapseRecovery:
    """stability.collapse.action: rollback. At an epoch's end whose validation loss rose back to a uniform guess
    (`back_to_a_uniform_guess`, against the best epoch so far), every rank puts back the model and optimizer
    state of that best epoch (a CPU copy kept when it was best) and multiplies the LR by `lr_factor` for the
    rest of the run. The schedule runs on: the run's length does not change. The validation loss is
    all-reduced, so every rank takes the same decision with no extra communication. The copy lives in memory only: a resumed run keeps its LR cut and its
    count of rollbacks, and starts looking for its best epoch afresh."""

    def __init__(self, chance: float, spec):
        self.chance, self.spec = chance, spec
        self.best, self.best_epoch, self.snapshot = math.inf, None, None
        self.last = math.inf  # the previous epoch's validation loss
        self.lr_factor, self.rollbacks = 1.0, 0

    def before_step(self, state) -> None:
        state.lr_scale *= self.lr_factor

    def on_epoch_end(self, state, metrics: dict) -> None:
        val = metrics[mk.VAL_LOSS]
        if not math.isfinite(val):
            return  # the non-finite guard's and early stopping's business
        rose, self.last = val > self.last, val
        if val < self.best:
            self.best, self.best_epoch = val, state.epoch
            self.snapshot = capture(state, into=self.snapshot)
            return
        # A collapse is a rise back to chance. A loss coming down through it is a model learning new data:
        # `data_shift` seed 1 read 6.20, 4.68, then 2.45 (chance 2.30), and was rolled back to its pre-shift
        # weights before this check (measured; it still ended at 0.992).
        if (not rose or self.snapshot is None or self.rollbacks >= self.spec.max_rollbacks
                or not back_to_a_uniform_guess(val, self.best, self.chance)):
            return
        lrs = [group["lr"] for group in state.optimizer.param_groups]  # the schedule's, now
        restore(state, {**self.snapshot, "schedule": None, "scaler": None})  # None: left as they are
        for group, lr in zip(state.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.lr_factor *= self.spec.lr_factor
        self.rollbacks += 1
        state.events.append({"step": state.step, "trigger": "collapse", "value": round(val, 4), "action": "rollback",
                             "rollback_to_epoch": self.best_epoch, "lr_factor": self.lr_factor})

    def on_report(self, metrics: dict) -> None:
        metrics[mk.COLLAPSE_ROLLBACKS] = self.rollbacks

    def state_dict(self) -> dict:
        return {"lr_factor": self.lr_factor, "rollbacks": self.rollbacks}

    def load_state_dict(self, sd: dict) -> None:
        self.lr_factor, self.rollbacks = sd["lr_factor"], sd["rollbacks"]  # best and last start afresh, as documented
