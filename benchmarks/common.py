"""Shared helpers: machine description, interleaved timing, markdown tables, JSON results."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {gpu}, torch {torch.__version__}"


def sync(device) -> None:
    """Wait for a CUDA device's queued work (timings end here); nothing to wait for on the CPU."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def interleaved(variants: dict[str, Callable[[], None]], rounds: int, per_round: int,
                cpu: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Per-call seconds of each variant, interleaved so machine noise hits all alike. The order rotates every
    round (A B C, B C A, C A B, ...), so no variant always follows the same one: with a fixed order, the median
    round of benchmarks.guards_overhead had guards on / off at 0.965, the extra work of the guards (first in
    every round) measuring as a 3.5% saving, a position effect that rotating the order averages out.
    `cpu`, when given, also receives each round's per-call CPU seconds of this process (all its threads):
    the work a variant does, without the time the process waited to be scheduled on a shared machine."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = variants[name]
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(per_round):
                fn()
            times[name].append((time.perf_counter() - start) / per_round)
            if cpu is not None:
                cpu.setdefault(name, []).append((time.process_time() - start_cpu) / per_round)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def median_ci(xs: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free confidence interval for the median: the order statistics x_(k) and x_(n+1-k), with k
    the largest rank whose two-sided binomial(n, 1/2) tail stays within 1 - level. None when n is too small
    for the level (n < 6 at 95%). No assumption about the noise's shape, which on a shared machine is skewed."""
    ordered, n = sorted(xs), len(xs)
    tail, k = 0.0, 0
    while k < n:  # P(fewer than k+1 of n samples below the median) stays <= (1 - level) / 2
        tail += math.comb(n, k) / 2 ** n
        if tail > (1 - level) / 2:
            break
        k += 1
    return None if k == 0 else (ordered[k - 1], ordered[n - k])


def verdict(interval: tuple[float, float] | None, target: float) -> str:
    """Whether a ratio's interval settles `ratio <= target`: met, missed or not resolved by the noise."""
    if interval is None:
        return "too few rounds for an interval"
    return "met" if interval[1] <= target else "missed" if interval[0] > target else "not resolved"


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


def keel_train_pipeline(spec):
    """Keel's own training pipeline for `spec`, as `keel run` builds it: (plan, epoch clock, train dataset)
    on the embedded local Ray. The caller sets the clock before each epoch, as the loop does."""
    from orchestrator.data.pipeline import build_datasets
    from orchestrator.ray_session import ensure_ray, open_run_channel
    from orchestrator.train.planning import preflight

    plan = preflight(spec)
    ensure_ray(None)
    clock = open_run_channel()
    return plan, clock, build_datasets(spec, plan, clock)["train"]


def start_ranks(fn, args: tuple, nprocs: int, preload: list[str]) -> None:
    """torch.multiprocessing.start_processes(fn, args, nprocs), joined, with the processes forked from a
    fork server that has imported `preload` once (a clean interpreter, not the caller with its threads or
    Ray session). Fresh interpreters re-importing torch, Ray and Keel took ~3 s per start on 2 cores."""
    import multiprocessing

    import torch.multiprocessing as mp

    multiprocessing.set_forkserver_preload(["torch", "torch.distributed", *preload])  # used when the server starts
    mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="forkserver")


@contextmanager
def gloo_group(rank: int = -1, world: int = -1, init_method: str = "env://") -> Iterator[None]:
    """A gloo process group for the `with` body, ended cleanly.

    Ended with a barrier (no rank tears down its pairs while a peer still talks) and a collection
    before destroy_process_group, so a DDP wrapper made in the body (run the body in a function so its
    locals are gone) does not keep the group alive into interpreter shutdown: gloo's threads destroyed
    there abort the process ("terminate called without an active exception", SIGABRT in CI).
    """
    import gc

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        yield
        dist.barrier()
    finally:
        gc.collect()
        dist.destroy_process_group()
