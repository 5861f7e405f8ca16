"""Shared helpers: machine description, interleaved timing, markdown tables, JSON results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {gpu}, torch {torch.__version__}"


def interleaved(variants: dict[str, Callable[[], None]], rounds: int, per_round: int) -> dict[str, list[float]]:
    """Per-call seconds of each variant, alternating A B A B ... so machine noise hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            for _ in range(per_round):
                fn()
            times[name].append((time.perf_counter() - start) / per_round)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def save(name: str, payload: dict) -> Path:
    """Write results JSON (to $KEEL_BENCH_RESULTS if set, read at call time, else benchmarks/results/)."""
    results = Path(os.environ.get("KEEL_BENCH_RESULTS", DEFAULT_RESULTS))
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{name}.json"
    path.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": machine(), **payload}, indent=1))
    return path
