"""Curriculum learning: train on the easiest fraction of the data, widening the pool each epoch.

Difficulty is a score per training row (a column, or the per-sample loss of an earlier
checkpoint). The pacing function gives the fraction of the data in the pool at each epoch
(Bengio et al. 2009; pacing functions after Hacohen & Weinshall 2019, root after Platanios
et al. 2019); the pool is the rows whose score is at most that fraction's quantile.
"""

from __future__ import annotations

import math

import numpy as np


def pacing(epoch: int, kind: str, start: float, full_epoch: int, steps: int = 4) -> float:
    """Fraction of the (easiest-first) data in the pool at `epoch` (plain function)."""
    t = min(1.0, epoch / max(1, full_epoch))
    if kind == "linear":
        return start + (1 - start) * t
    if kind == "root":
        return math.sqrt(t * (1 - start ** 2) + start ** 2)
    if kind == "step":
        return start + (1 - start) * math.floor(t * steps) / steps
    raise ValueError(f"unknown pacing {kind!r}")


def thresholds(scores: np.ndarray, spec, epochs: int) -> list[float]:
    """Per epoch, the highest difficulty admitted to the pool."""
    out = []
    for epoch in range(epochs):
        fraction = pacing(epoch, spec.pacing, spec.start_fraction, spec.full_epoch)
        out.append(float("inf") if fraction >= 1 else float(np.quantile(scores, fraction)))
    return out


def pool_sizes(scores: np.ndarray, limits: list[float]) -> list[int]:
    return [int((scores <= limit).sum()) for limit in limits]
