"""Helpers shared by tests (import from here, not from conftest)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _gloo_entry(rank: int, fn: Callable[[int], dict], init_file: str, out_dir: str, world: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = fn(rank)
        dist.barrier()
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def on_gloo_ranks(fn: Callable[[int], dict], world: int, tmp: Path) -> list[dict]:
    """Run `fn(rank)` (a module-level function) in `world` real processes joined by a gloo process
    group; return each rank's dict, rank order."""
    mp.start_processes(_gloo_entry, args=(fn, str(tmp / "init"), str(tmp), world), nprocs=world, start_method="spawn")
    return [torch.load(tmp / f"{r}.pt", weights_only=False) for r in range(world)]
