"""Step time with every guard on vs. the spine alone, same model, data and batch, one process.

'on': norm clipping, non-finite guard, spike detection with rollback snapshots, diagnostics.
'off': clipping none, spike detection off, diagnostics off (the non-finite guard stays: it is
the spine's one all-reduce). Rounds alternate on/off so machine noise hits both alike.
Target: on/off <= 1.03.

    python -m benchmarks.guards_overhead [--steps N] [--rounds R] [--job jobs/digits-resnet.yaml]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import interleaved, machine, median, save, table
from orchestrator.spec import load_spec
from orchestrator.train.components import build_components
from orchestrator.train.loop import train_step

GUARDS_OFF = ["stability.clip.mode=none", "stability.spike.enabled=false", "stability.diagnostics.enabled=false"]
GUARDS_ON = ["stability.clip.mode=norm", "stability.spike.enabled=true", "stability.spike.action=rollback",
             "stability.diagnostics.enabled=true"]


def stepper(job: str, overrides: list[str]):
    spec = load_spec(job, overrides + ["faults=[]"])
    comps = build_components(spec, steps_per_epoch=1000, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    shape, b = spec.data.shape, spec.data.batch_size
    batches = [{"x": torch.rand(b, *shape, generator=g).flatten(1), "y": torch.randint(0, spec.data.num_classes, (b,), generator=g)}
               for _ in range(8)]
    counter = {"i": 0}

    def step():
        train_step(comps, batches[counter["i"] % len(batches)], spec)
        counter["i"] += 1
    return step


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", default="jobs/digits-resnet.yaml")
    parser.add_argument("--steps", type=int, default=20, help="steps per round")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    variants = {"guards on": stepper(args.job, GUARDS_ON), "guards off": stepper(args.job, GUARDS_OFF)}
    for fn in variants.values():  # warm-up: allocator, first snapshot
        for _ in range(5):
            fn()
    times = interleaved(variants, args.rounds, args.steps)
    on, off = median(times["guards on"]), median(times["guards off"])
    result = {"job": args.job, "steps_per_round": args.steps, "rounds": args.rounds,
              "median_step_s": {"guards_on": on, "guards_off": off}, "ratio_on_off": on / off, "target": 1.03}
    print(f"guards overhead on {args.job} ({machine()})\n")
    print(table(["variant", "median step (ms)"], [["guards on", f"{on * 1e3:.2f}"], ["guards off", f"{off * 1e3:.2f}"],
                                                   ["**ratio on/off**", f"**{on / off:.3f}** (target <= 1.03)"]]))
    print(f"\nwrote {save('guards_overhead', result)}")
    return result


if __name__ == "__main__":
    main()
