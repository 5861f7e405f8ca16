"""The files a run leaves for people and their tools, written by the driver as reports arrive:

  metrics.jsonl   one JSON object per epoch (everything reported, guard events included)
  metrics.csv     the same epochs, scalar columns only (spreadsheets, pandas)
  steps.jsonl     the live per-step samples (every run.log_every steps): loss, grad norm, LR
  tensorboard/    TensorBoard event files: per-epoch and per-step scalars, guard events, data wait
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Optional

from orchestrator import metric_keys as mk
from orchestrator.numbers import finite


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN; null means "not a number this epoch"
    return value


class MetricsLog:
    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.csv_path = self.run_dir / "metrics.csv"
        self.steps_path = self.run_dir / "steps.jsonl"
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))

    def append(self, metrics: dict) -> None:
        row = {k: _finite_or_none(v) for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float, str)) or v is None}
        new = not self.csv_path.exists()
        with self.csv_path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(scalars), extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(scalars)
        if self.writer is not None:
            step = metrics.get(mk.STEP, metrics.get(mk.EPOCH, 0))
            for key in mk.EPOCH_SCALARS:
                value = metrics.get(key)
                if finite(value):
                    self.writer.add_scalar(f"epoch/{key}", value, step)
            for event in metrics.get(mk.EVENTS) or []:
                self.writer.add_scalar(f"events/{event['trigger']}", 1.0, event["step"])
                self.writer.add_text("events", f"step {event['step']}: {event['trigger']} -> {event['action']} "
                                               f"(value {event.get('value')})", event["step"])
            self.writer.flush()

    def step(self, event: dict) -> None:
        sample = {k: _finite_or_none(event.get(k)) for k in (mk.GLOBAL_STEP, mk.EPOCH, *mk.STEP_SCALARS)}
        with self.steps_path.open("a") as f:
            f.write(json.dumps(sample) + "\n")
        if self.writer is not None and sample[mk.GLOBAL_STEP] is not None:
            for key in mk.STEP_SCALARS:
                if sample[key] is not None:
                    self.writer.add_scalar(f"step/{key}", sample[key], sample[mk.GLOBAL_STEP])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_metrics(run_dir: Path) -> list[dict]:
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


def read_steps(run_dir: Path) -> list[dict]:
    return read_jsonl(Path(run_dir) / "steps.jsonl")


def read_stability(run_dir: Path) -> Optional[dict]:
    path = Path(run_dir) / "stability_report.json"
    return json.loads(path.read_text()) if path.exists() else None
