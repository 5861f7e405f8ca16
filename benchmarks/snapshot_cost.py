"""Rollback snapshots at scale: what one costs, and what it adds per training step when taken every
`snapshot_every` steps, blocking (a plain copy) or in the background (the copy overlaps the next step's
forward and backward; the next update waits for it), as SpikeGuard takes them. The ring is full before
timing starts, as in any run past its first `3 x snapshot_every` steps: each new snapshot is written into
the memory of the one it drops. One snapshot's copy is timed both ways: into fresh memory and into recycled.

A synthetic MLP of N parameters with Adam (its two moments make the state 3x the weights) trains on a
small batch on the CPU. Variants interleave round by round; medians and ranges. 1B parameters do not fit
this machine three times over (weights, moments, snapshots): that row is extrapolated from the measured
copy rate and says so.

On a GPU (`--device cuda`) the model and its state live on the device, the step runs under bf16 autocast
on `--batch` rows, and a snapshot is a device-to-host copy into pinned memory (on a side stream in the
background mode). The pageable copy (`.to("cpu")` per tensor, what the CPU path does) is timed beside it.

    python -m benchmarks.snapshot_cost [--sizes 10e6,100e6] [--rounds 3] [--every 25]
    python -m benchmarks.snapshot_cost --device cuda --sizes 100e6,1000e6 --batch 8192
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from benchmarks.common import machine, median, save, sync, table
from orchestrator.stability.snapshots import SnapshotRing, capture
from orchestrator.train.hooks import StepState
from orchestrator.train.schedules import Schedule

WIDTH = 2048


def synthetic(params: float, device: torch.device = torch.device("cpu"), batch: int = 8,
              batch_norm: bool = False) -> tuple[StepState, torch.Tensor]:
    layers = max(1, round(params / (WIDTH * WIDTH + WIDTH)))
    blocks = [[nn.Linear(WIDTH, WIDTH)] + ([nn.BatchNorm1d(WIDTH)] if batch_norm else []) for _ in range(layers)]
    model = nn.Sequential(*[m for block in blocks for m in block]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(batch, WIDTH, device=device)
    model(x).square().mean().backward()
    opt.step()  # the moments exist
    schedule = Schedule(torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0), None)
    return StepState(model=model, optimizer=opt, device=device, schedule=schedule), x


def pageable_copy(state: StepState) -> dict:
    """The copy before pinned memory: `.to("cpu")` tensor by tensor, each one a blocking transfer."""
    return {"model": {k: v.to("cpu") for k, v in state.model.state_dict().items()},
            "optimizer": {i: {k: v.to("cpu") if torch.is_tensor(v) else v for k, v in st.items()}
                          for i, st in state.optimizer.state_dict()["state"].items()}}


def tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def steps(state: StepState, x: torch.Tensor, n: int, every: int, mode: str) -> float:
    """Seconds per step over n steps; mode none | blocking | background (as SpikeGuard does it)."""
    ring = SnapshotRing(3)
    for i in range(3 if mode != "none" else 0):  # a full ring: the steady state of a run
        ring.add(-i, state)
    sync(state.device)
    start = time.perf_counter()
    for step in range(n):
        state.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(state.device.type, dtype=torch.bfloat16, enabled=state.device.type == "cuda"):
            state.model(x).float().square().mean().backward()
        ring.wait()  # before_step: a background copy must be done before the update
        state.optimizer.step()
        # after_step; mid-window, so a background copy overlaps the steps after it inside the timed window too
        if mode != "none" and (step + 1) % every == every // 2:
            ring.add(step + 1, state, background=mode == "background")
    ring.wait()
    sync(state.device)
    return (time.perf_counter() - start) / n


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10e6,100e6")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8, help="rows per step")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    results, rows = {}, []
    for size in (float(s) for s in args.sizes.split(",")):
        state, x = synthetic(size, device, args.batch)
        params = sum(p.numel() for p in state.model.parameters())
        copy_s, recycled_s, pageable_s, per_step = [], [], [], {m: [] for m in ("none", "blocking", "background")}
        previous = capture(state)
        snapshot_bytes = tensor_bytes(previous)  # what one snapshot holds in host memory
        for _ in range(args.rounds):
            start = time.perf_counter()
            fresh = capture(state)
            copy_s.append(time.perf_counter() - start)
            del fresh
            start = time.perf_counter()
            capture(state, into=previous)
            recycled_s.append(time.perf_counter() - start)
            if device.type == "cuda":
                start = time.perf_counter()
                pageable_copy(state)  # dropped at once: only its time is wanted
                pageable_s.append(time.perf_counter() - start)
            for mode in per_step:
                per_step[mode].append(steps(state, x, 2 * args.every, args.every, mode))
        overhead = {m: [t / base - 1 for t, base in zip(per_step[m], per_step["none"])] for m in ("blocking", "background")}
        results[f"{params / 1e6:.0f}M"] = {"params": params, "snapshot_s": copy_s, "recycled_snapshot_s": recycled_s,
                                           "snapshot_bytes": snapshot_bytes, "step_s": per_step, "overhead": overhead,
                                           "pageable_snapshot_s": pageable_s}
        rows.append([f"{params / 1e6:.0f}M", f"{median(copy_s):.2f} ({min(copy_s):.2f}-{max(copy_s):.2f})",
                     f"{median(recycled_s):.3f} ({min(recycled_s):.3f}-{max(recycled_s):.3f})",
                     f"{snapshot_bytes / 1e9:.2f}", f"{median(per_step['none']):.3f}",
                     *(f"{median(overhead[m]):+.1%} ({min(overhead[m]):+.1%} to {max(overhead[m]):+.1%})" for m in overhead)])
        del state, x, previous
    largest = results[max(results, key=lambda k: results[k]["params"])]
    rate = largest["params"] / median(largest["snapshot_s"])  # parameters copied per second (weights + moments)
    recycled_rate = largest["params"] / median(largest["recycled_snapshot_s"])
    rows.append(["1000M (extrapolated)", f"{1e9 / rate:.1f}", f"{1e9 / recycled_rate:.2f}",
                 f"{largest['snapshot_bytes'] * 1e9 / largest['params'] / 1e9:.1f}", "-", "-", "-"])
    print(f"rollback snapshot cost on {device.type}, batch {args.batch}, every {args.every} steps, {args.rounds} rounds "
          f"({machine()})\n")
    for key, r in results.items():
        if r["pageable_snapshot_s"]:
            print(f"{key}: pageable copy (.to('cpu') per tensor) {median(r['pageable_snapshot_s']):.3f} s")
    print(table(["params", "one snapshot s, fresh memory (range)", "one snapshot s, recycled memory (range)", "snapshot GB",
                 "step s", "blocking: per-step overhead",
                 "background: per-step overhead"], rows))
    result = {"device": device.type, "batch": args.batch, "every": args.every, "rounds": args.rounds, "sizes": results, "extrapolated_1b_snapshot_s": 1e9 / rate,
              "extrapolated_1b_recycled_snapshot_s": 1e9 / recycled_rate}
    print(f"\nwrote {save('snapshot_cost', result)}")
    return result


if __name__ == "__main__":
    main()
