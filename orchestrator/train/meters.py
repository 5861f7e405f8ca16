"""Per-epoch accumulation of step statistics, and live progress sent to the driver."""

from __future__ import annotations

import math
import time
from typing import Any, Iterable, Iterator

from orchestrator import metric_keys as mk


class EpochMeter:
    """Host-side sums of the per-step agreed values (already Python floats: no extra syncs)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.wait = 0.0
        self.steps = self.samples = 0
        self.loss_sum = self.loss_n = 0.0
        self.norms: list[float] = []

    def timed(self, batches: Iterable) -> Iterator:
        """Yield from `batches`, adding the time spent waiting for each one to `self.wait`."""
        it = iter(batches)
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.wait += time.perf_counter() - t
            yield batch

    def add(self, global_loss: float, grad_norm: float, global_samples: int) -> None:
        self.steps += 1
        self.samples += global_samples
        if math.isfinite(global_loss):
            self.loss_sum += global_loss
            self.loss_n += 1
        if math.isfinite(grad_norm):
            self.norms.append(grad_norm)

    def summary(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {
            mk.TRAIN_LOSS: self.loss_sum / self.loss_n if self.loss_n else float("nan"),
            mk.GRAD_NORM_MEAN: sum(self.norms) / len(self.norms) if self.norms else float("nan"),
            mk.GRAD_NORM_MAX: max(self.norms) if self.norms else float("nan"),
            mk.SAMPLES_PER_S: self.samples / elapsed,
            mk.DATA_WAIT_FRAC: self.wait / elapsed,
            mk.EPOCH_TIME_S: elapsed,
        }


class ProgressSender:
    """Rank 0 pushes small dicts to the driver's run channel, fire-and-forget (never blocks a step)."""

    def __init__(self, channel: Any, rank: int):
        self.channel = channel if rank == 0 else None

    def send(self, kind: str, **payload: Any) -> None:
        if self.channel is not None:
            self.channel.put.remote({"type": kind, **payload})
