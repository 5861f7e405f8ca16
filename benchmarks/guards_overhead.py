"""Step time with every guard on (Keel's defaults) vs. the spine alone, under DDP with 2 gloo workers.

Both variants live in the same 2 processes (same model, data and batch; synchronized BN and DDP in
both), and rounds alternate on/off in lockstep on both ranks, so machine noise hits both alike.
'on': the defaults: clip.mode auto, non-finite guard, spike detection with rollback snapshots,
diagnostics. 'off': clipping none, spike detection off, diagnostics off (the non-finite guard stays:
it is the spine's one all-reduce). Target: median on/off <= 1.03, decided by a 95% interval for the median
of the per-round ratios (order statistics, no assumption about the noise): met when its top is <= 1.03.
The variants' order rotates every round (see benchmarks.common.interleaved). Rank 0's CPU time per step is
reported beside the wall time: the guards' own work, without the waits for the other rank and the scheduler.
A third variant, the defaults with per-worker BN (`stability.sync_batchnorm: false`), prices synchronized
BN: two all-reduces per BN layer per training step (statistics forward, gradient sums backward).

    python -m benchmarks.guards_overhead [--steps N] [--rounds R] [--job jobs/digits-resnet.yaml]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

from benchmarks.common import gloo_group, interleaved, machine, median, median_ci, save, start_ranks, table, verdict

GUARDS_OFF = ["stability.clip.mode=none", "stability.spike.enabled=false", "stability.diagnostics.enabled=false"]
GUARDS_ON: list[str] = []  # Keel's defaults
PER_WORKER_BN = ["stability.sync_batchnorm=false"]
WORLD = 2


def stepper(job: str, overrides: list[str], rank: int):
    from torch.nn.parallel import DistributedDataParallel

    from orchestrator.spec import load_spec
    from orchestrator.train.components import build_components
    from orchestrator.train.loop import train_step

    spec = load_spec(job, overrides + ["faults=[]"])
    comps = build_components(spec, steps_per_epoch=1000, device=torch.device("cpu"), prepare_model=DistributedDataParallel)
    g = torch.Generator().manual_seed(rank)
    shape, b = spec.data.shape, spec.data.batch_size
    batches = [{"x": torch.rand(b, *shape, generator=g).flatten(1), "y": torch.randint(0, spec.data.num_classes, (b,), generator=g)}
               for _ in range(8)]
    counter = {"i": 0}

    def step():
        train_step(comps, batches[counter["i"] % len(batches)], spec)
        counter["i"] += 1
    return step


def _worker(rank: int, init_file: str, out: str, job: str, rounds: int, steps: int) -> None:
    torch.set_num_threads(1)  # 2 processes on 2 cores
    with gloo_group(rank, WORLD, f"file://{init_file}"):
        times = measure(job, rounds, steps, rank)
    if rank == 0:  # {"wall": {variant: per-round seconds per step}, "cpu": the same in this process's CPU time}
        torch.save(times, out)


def measure(job: str, rounds: int, steps: int, rank: int) -> dict[str, dict[str, list[float]]]:
    variants = {"guards on": stepper(job, GUARDS_ON, rank), "guards off": stepper(job, GUARDS_OFF, rank),
                "per-worker BN": stepper(job, PER_WORKER_BN, rank)}
    for fn in variants.values():  # warm-up: allocator, first snapshot
        for _ in range(5):
            fn()
    cpu: dict[str, list[float]] = {}
    wall = interleaved(variants, rounds, steps, cpu=cpu)
    return {"wall": wall, "cpu": cpu}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", default="jobs/digits-resnet.yaml")
    parser.add_argument("--steps", type=int, default=50, help="steps per round: a multiple of the snapshot (25) and "
                        "diagnostics (50) periods, so every round holds the same periodic work (20 made rounds differ)")
    parser.add_argument("--rounds", type=int, default=121, help="the 95%% interval was 9 points wide with 31 rounds (0.976–1.062), 6–7 with 61")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.pt")
        start_ranks(_worker, (os.path.join(tmp, "init"), out, args.job, args.rounds, args.steps), WORLD,
                    ["orchestrator.train.loop", "benchmarks.guards_overhead"])
        measured = torch.load(out)
    times, cpu = measured["wall"], measured["cpu"]
    on, off, local_bn = median(times["guards on"]), median(times["guards off"]), median(times["per-worker BN"])
    ratios = sorted(a / b for a, b in zip(times["guards on"], times["guards off"]))
    bn_ratios = sorted(a / b for a, b in zip(times["guards on"], times["per-worker BN"]))
    interval = median_ci(ratios)
    cpu_ratios = sorted(a / b for a, b in zip(cpu["guards on"], cpu["guards off"]))
    cpu_interval = median_ci(cpu_ratios)
    result = {"job": args.job, "world_size": WORLD, "steps_per_round": args.steps, "rounds": args.rounds,
              "median_step_s": {"guards_on": on, "guards_off": off, "per_worker_bn": local_bn}, "ratio_on_off": on / off,
              "per_round_ratio_min_max": [ratios[0], ratios[-1]], "target": 1.03,
              "median_per_round_ratio": median(ratios), "median_ratio_ci95": interval,
              "verdict": verdict(interval, 1.03),
              "cpu_time": {"median_step_s": {"guards_on": median(cpu["guards on"]), "guards_off": median(cpu["guards off"])},
                           "median_per_round_ratio": median(cpu_ratios), "median_ratio_ci95": cpu_interval,
                           "per_round_ratio_min_max": [cpu_ratios[0], cpu_ratios[-1]]},
              "ratio_sync_bn": median(bn_ratios), "sync_bn_per_round_min_max": [bn_ratios[0], bn_ratios[-1]]}
    print(f"guards overhead on {args.job}, DDP with {WORLD} gloo workers ({machine()})\n")
    print(table(["variant", "median step (ms)"], [["guards on (defaults)", f"{on * 1e3:.2f}"], ["guards off", f"{off * 1e3:.2f}"],
                                                   ["defaults with per-worker BN", f"{local_bn * 1e3:.2f}"],
                                                   ["**ratio on/off**", f"**{on / off:.3f}** (per-round {ratios[0]:.3f}–{ratios[-1]:.3f}; target <= 1.03)"],
                                                   ["median per-round ratio, 95% interval", f"{median(ratios):.3f}, "
                                                    + _span(interval)
                                                    + f": target {result['verdict']}"],
                                                   ["the same in rank 0's CPU time (its work, not its waits)",
                                                    f"{median(cpu_ratios):.3f}, " + _span(cpu_interval)],
                                                   ["synchronized BN: defaults / per-worker BN", f"{median(bn_ratios):.3f} (per-round {bn_ratios[0]:.3f}–{bn_ratios[-1]:.3f})"]]))
    print(f"\nwrote {save('guards_overhead', result)}")
    return result


def _span(interval) -> str:
    return f"{interval[0]:.3f}–{interval[1]:.3f}" if interval else "none"


if __name__ == "__main__":
    main()
