"""Metrics files in the run directory: one JSON object per epoch in `metrics.jsonl`."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN; null means "not a number this epoch"
    return value


class MetricsLog:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"

    def append(self, metrics: dict) -> None:
        row = {k: _finite_or_none(v) for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
