"""Divergence-aware stopping: a Tune Stopper, so it composes with any scheduler.

Stock ASHA/HyperBand/PBT/FIFO let a trial reporting NaN run to the end (measured on Ray 2.60).
This stops a trial at its first report with a non-finite metric or loss, when its loss exceeds
k times its first value or an absolute threshold, or when Keel's own guards declared it diverged.
The reasons are kept (and written to keel_diverged.json) so results can mark such trials. Under PBT
(stop=False) it only records: the trial lives on at the worst score until PBT clones a good one over it.
"""

from __future__ import annotations

import json
import math
from typing import Optional

from ray import tune

from orchestrator import metric_keys as mk
from orchestrator.numbers import finite
from orchestrator.storage import read_text, write_text


def divergence_reason(result: dict, first_loss: Optional[float], *, metric: str, loss_metric: str,
                      loss_factor: float, loss_threshold: Optional[float]) -> Optional[str]:
    """Plain-function twin: why this report means the trial diverged, or None."""
    if result.get(mk.DIVERGED):
        return result.get(mk.STOP_REASON) or "diverged (Keel guards)"
    for key in (metric, loss_metric):
        value = result.get(key)
        if isinstance(value, (int, float)) and not math.isfinite(value):
            return f"{key} is {value}"
    loss = result.get(loss_metric)
    if isinstance(loss, (int, float)):
        if loss_threshold is not None and loss > loss_threshold:
            return f"{loss_metric} {loss:.4g} above threshold {loss_threshold:.4g}"
        if first_loss is not None and first_loss > 0 and loss > loss_factor * first_loss:
            return f"{loss_metric} {loss:.4g} exploded above {loss_factor:g}x its first value {first_loss:.4g}"
    return None


class DivergenceStopper(tune.Stopper):
    def __init__(self, spec, metric: str, record: Optional[str] = None, stop: bool = True):
        """record: where the reasons are kept, a local path or a URI on object storage."""
        self.spec, self.metric, self.record, self.stop = spec, metric, record, stop
        self.first_loss: dict[str, float] = {}
        self.reasons: dict[str, dict] = self._load()

    def _load(self) -> dict[str, dict]:
        text = read_text(self.record) if self.record else None
        return json.loads(text) if text else {}

    def __setstate__(self, state: dict) -> None:
        # A resumed sweep unpickles the stopper Tune saved at the start: the record, not that copy, is current.
        self.__dict__.update(state)
        self.reasons = self._load()

    def __call__(self, trial_id: str, result: dict) -> bool:
        if not self.spec.enabled:
            return False
        previous = self.reasons.get(trial_id)
        if previous and result.get("cloned_from") and not previous.get("cloned_from"):
            previous["cloned_from"] = result["cloned_from"]  # PBT replaced it with a clone of a good trial
            previous["loaded_donor_weights"] = result.get("clone_loaded_donor_weights")  # bit for bit, or 0
            self._save()
        reason = divergence_reason(result, self.first_loss.get(trial_id), metric=self.metric,
                                   loss_metric=self.spec.loss_metric, loss_factor=self.spec.loss_factor,
                                   loss_threshold=self.spec.loss_threshold)
        loss = result.get(self.spec.loss_metric)
        if trial_id not in self.first_loss and finite(loss):
            self.first_loss[trial_id] = loss
        if reason is None or (previous and not previous.get("cloned_from")):
            return False  # healthy, or (PBT) already recorded and waiting to be replaced
        self.reasons[trial_id] = {"reason": reason, "iteration": result.get("training_iteration")}
        self._save()
        return self.stop

    def _save(self) -> None:
        if self.record is not None:
            write_text(self.record, json.dumps(self.reasons, indent=1))

    def stop_all(self) -> bool:
        return False
