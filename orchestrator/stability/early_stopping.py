"""Early stopping on a validation metric, agreed across ranks.

Validation metrics are all-reduced before they reach here, so every rank sees
the same value; the stop flag is still agreed with an all-reduce before
anyone acts, so a rank with a stray value can never leave the others hanging.
"""

from __future__ import annotations

import math
from typing import Optional

from orchestrator.stability.distributed import agree_any
from orchestrator.stability.stop import StopReason, diverged, early_stop


def early_stop_decision(value: float, best: Optional[float], bad_epochs: int, *, mode: str, patience: int,
                        min_delta: float = 0.0, divergence_threshold: Optional[float] = None,
                        check_finite: bool = True) -> tuple[Optional[float], int, Optional[StopReason]]:
    """Plain-function twin: returns (new best, new bad-epoch count, stop reason or None)."""
    if check_finite and not math.isfinite(value):
        return best, bad_epochs, diverged(f"metric is {value}")
    if divergence_threshold is not None and (value > divergence_threshold if mode == "min" else value < divergence_threshold):
        return best, bad_epochs, diverged(f"metric {value:.4g} beyond divergence_threshold {divergence_threshold}")
    improved = best is None or (value < best - min_delta if mode == "min" else value > best + min_delta)
    if improved:
        return value, 0, None
    bad_epochs += 1
    if bad_epochs >= patience:
        return best, bad_epochs, early_stop(f"no improvement for {bad_epochs} epochs (best {best:.4g})")
    return best, bad_epochs, None


class EarlyStopping:
    def __init__(self, metric: str, mode: str, patience: int, min_delta: float = 0.0,
                 divergence_threshold: Optional[float] = None, check_finite: bool = True):
        self.metric, self.mode, self.patience, self.min_delta = metric, mode, patience, min_delta
        self.divergence_threshold, self.check_finite = divergence_threshold, check_finite
        self.best: Optional[float] = None
        self.bad_epochs = 0

    def on_epoch_end(self, state, metrics: dict) -> None:
        self.best, self.bad_epochs, reason = early_stop_decision(
            metrics[self.metric], self.best, self.bad_epochs, mode=self.mode, patience=self.patience,
            min_delta=self.min_delta, divergence_threshold=self.divergence_threshold, check_finite=self.check_finite)
        if agree_any(reason is not None, state.device) and state.stop_reason is None:
            state.stop_reason = reason or early_stop("another rank asked to stop")

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, sd: dict) -> None:
        self.best, self.bad_epochs = sd["best"], sd["bad_epochs"]
