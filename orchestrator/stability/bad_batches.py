"""Remember the batches a guard rejected, and drop them again after a resume.

A run that resumes from a checkpoint older than a rejected batch meets that batch again (Lightning's
SpikeDetection keeps an `exclude_batches_path` for the same reason). A batch is named by its epoch and
its index in the epoch: the same data on a resume as long as the epoch's order is reproducible (a
fixed seed; Ray Data hands blocks to workers dynamically, so across a restart the name is a strong
hint, not a guarantee).

The list is written to the run directory as bad_batches.json the moment a batch is rejected (by rank 0,
where the storage is a local or shared path), and read back at start-up: a crash after the last
checkpoint does not forget it. It also travels in checkpoints (the record on object storage). Every
rank holds rank 0's list, so every rank drops the same batches.

Not remembered: the batches a rollback skips (they were not bad, only too close to a spike), and
injected faults (a test's doing, not the data's).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from orchestrator.stability.distributed import broadcast_object, rank

REJECTING_TRIGGERS = ("nonfinite", "batch_outlier", "loss_spike", "grad_spike")


def rejected_now(events: list[dict], step: int) -> list[str]:
    """Plain-function twin: the triggers that rejected the batch of `step` (empty: it was not rejected)."""
    return [e["trigger"] for e in events if e["step"] == step and e["trigger"] in REJECTING_TRIGGERS]


FILE = "bad_batches.json"


class BadBatches:
    def __init__(self, run_dir: Path | None = None):
        self.path = run_dir / FILE if run_dir is not None else None  # None: object storage, checkpoints only
        self.batches: list[dict] = []  # {epoch, index, step, trigger}, in the order met
        self.known: set[tuple[int, int]] = set()
        self.dropped = 0  # remembered batches met again and dropped
        self.epoch, self.index = None, -1  # the batch in hand: counted here, so no caller has to say

    def recall(self) -> None:
        """At start-up, after any resume: add what the run directory remembers (rank 0 reads, all get it)."""
        found = None
        if rank() == 0 and self.path is not None and self.path.is_file():
            try:
                found = json.loads(self.path.read_text())
            except ValueError:
                found = None  # a torn write: the checkpoint's list still stands
        for b in broadcast_object(found) or []:
            self._remember(b)

    def on_batch(self, state, batch):
        if state.epoch != self.epoch:
            self.epoch, self.index = state.epoch, -1
        self.index += 1
        if (self.epoch, self.index) in self.known:
            self.dropped += 1
            return None  # every rank holds the same list: every rank drops it
        return batch

    def after_step(self, state) -> None:
        triggers = rejected_now(state.events, state.step)
        if triggers and self._remember({"epoch": self.epoch, "index": self.index, "step": state.step,
                                        "trigger": triggers[0]}) and state.rank == 0 and self.path is not None:
            self._write()

    def _write(self) -> None:
        tmp = self.path.with_name(FILE + ".tmp")
        try:
            tmp.write_text(json.dumps(self.batches, indent=1))
            os.replace(tmp, self.path)
        except OSError:  # rank 0 on a node without the run directory: checkpoints keep the list
            self.path = None

    def _remember(self, batch: dict) -> bool:
        key = (batch["epoch"], batch["index"])
        if key in self.known:
            return False
        self.known.add(key)
        self.batches.append(batch)
        return True

    def on_report(self, metrics: dict) -> None:
        metrics["bad_batches"] = len(self.batches)
        metrics["bad_batches_dropped_again"] = self.dropped

    def state_dict(self) -> dict:
        return {"batches": list(self.batches), "dropped": self.dropped}

    def load_state_dict(self, sd: dict) -> None:
        self.batches, self.known = [], set()
        for b in sd.get("batches", []):
            self._remember(b)
        self.dropped = sd.get("dropped", 0)
