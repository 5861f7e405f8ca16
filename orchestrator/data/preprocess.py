"""Deterministic preprocessing, fitted on the training split only and applied to every split.

`PreprocessState` is small and picklable: it travels to Ray Data tasks and into
every checkpoint, so inference later standardises exactly as training did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from orchestrator.data.scan import SplitScan, mean_std, nan_median

FEATURES, LABEL = "x", "y"  # column names inside Keel's pipeline


@dataclass
class PreprocessState:
    mean: Optional[np.ndarray] = None    # per feature (per-channel stats are broadcast to features)
    std: Optional[np.ndarray] = None
    fill: Optional[np.ndarray] = None    # imputation value per feature
    drop_bad_rows: bool = False
    num_classes: int = 2
    onehot: bool = False

    def to_dict(self) -> dict:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in vars(self).items()}


def fit_preprocess(scan: SplitScan, prep_spec, shape: list[int], num_classes: int, on_bad_rows: str,
                   soft_labels: bool) -> PreprocessState:
    """Statistics from the TRAINING split's scan only (validation must not leak into them)."""
    state = PreprocessState(drop_bad_rows=on_bad_rows == "drop", num_classes=num_classes,
                            onehot=prep_spec.labels == "onehot" or soft_labels)
    mean, std = mean_std(scan)
    if prep_spec.standardize == "per_channel" and len(shape) >= 2:
        c = shape[0]
        per = scan.count.reshape(c, -1).sum(1)
        ch_mean = scan.sum.reshape(c, -1).sum(1) / np.maximum(per, 1)
        ch_var = np.maximum(scan.sumsq.reshape(c, -1).sum(1) / np.maximum(per, 1) - ch_mean ** 2, 0)
        mean = np.repeat(ch_mean, scan.width // c)
        std = np.repeat(np.sqrt(ch_var), scan.width // c)
    if prep_spec.standardize != "none":
        state.mean, state.std = mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)
    if prep_spec.impute == "mean":
        state.fill = mean.astype(np.float32)
    elif prep_spec.impute == "median":
        state.fill = nan_median(scan).astype(np.float32)
    elif prep_spec.impute == "constant":
        state.fill = np.full(scan.width, prep_spec.impute_value, dtype=np.float32)
    return state


def apply_preprocess(x: np.ndarray, y: np.ndarray, state: PreprocessState) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Plain function: impute, drop bad rows (if asked), standardise, encode labels.
    Returns (x, y, keep) where keep marks the input rows that were kept."""
    x = x.astype(np.float32, copy=True)
    if state.fill is not None:
        nan = np.isnan(x)
        x[nan] = np.broadcast_to(state.fill, x.shape)[nan]
    keep = np.ones(len(x), dtype=bool)
    if state.drop_bad_rows:
        keep = np.isfinite(x).all(axis=1) & (y >= 0) & (y < state.num_classes) & (y == np.floor(y))  # float labels: whole
        x, y = x[keep], y[keep]
    if state.mean is not None:
        x = (x - state.mean) / state.std
    y = y.astype(np.int64)
    if state.onehot:
        y = np.eye(state.num_classes, dtype=np.float32)[y]
    return x, y, keep
