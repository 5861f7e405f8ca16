"""Where Keel's step loses to a plain step on a GPU: each guard turned off on its own, all of them off, and the
plain step, interleaved round by round on one model and precision; then torch.profiler's view of Keel's step
(the host-side calls that wait for the device, and the most expensive operators).

    python -m benchmarks.gpu_guards [--model resnet18] [--amp bf16] [--steps 30] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import machine, median, save, sync, table
from benchmarks.gpu_path import MODELS, PlainStep, job, make_batches, warmup_steps
from orchestrator.train.components import build_components
from orchestrator.train.loop import train_step

ALL_OFF = ["stability.clip.mode=none", "stability.spike.enabled=false", "stability.diagnostics.enabled=false",
           "stability.nonfinite.enabled=false", "stability.remember_bad_batches=false"]
VARIANTS = {
    "defaults": [],
    "clip off": ["stability.clip.mode=none"],
    "spike off": ["stability.spike.enabled=false"],
    "diagnostics off": ["stability.diagnostics.enabled=false"],
    "nonfinite off": ["stability.nonfinite.enabled=false"],
    "bad batches off": ["stability.remember_bad_batches=false"],
    "all guards off": ALL_OFF,
}


def keel_stepper(model: str, amp: str, batch: int, device: torch.device, overrides: list[str]):
    spec = job(model, amp, batch, device, overrides)
    comps = build_components(spec, steps_per_epoch=100_000, device=device)
    return lambda b: train_step(comps, b, spec)


def profile(step, batches, device: torch.device, steps: int = 10) -> dict:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for i in range(steps):
            step(batches[i % len(batches)])
        sync(device)
    events = prof.key_averages()
    waits = {e.key: e.count / steps for e in events
             if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaEventSynchronize")}
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")) / steps
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    return {"per_step_calls": waits, "kernel_launches_per_step": launches,
            "top_self_cpu": [(e.key, e.count // steps, e.self_cpu_time_total / steps / 1e3) for e in top]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="resnet18", choices=sorted(MODELS))
    parser.add_argument("--amp", default="bf16")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    batch = args.batch or MODELS[args.model][1]
    steppers = {name: keel_stepper(args.model, args.amp, batch, device, o) for name, o in VARIANTS.items()}
    spec = job(args.model, args.amp, batch, device)
    steppers["plain"] = PlainStep(spec, device, {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp])
    batches = make_batches(spec, batch, device)
    for fn in steppers.values():  # to a full snapshot ring, as in a long run
        for i in range(warmup_steps(spec)):
            fn(batches[i % 4])
    sync(device)
    seconds: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(args.rounds):
        for name, fn in steppers.items():
            start = time.perf_counter()
            for i in range(args.steps):
                fn(batches[i % 4])
            sync(device)
            seconds[name].append((time.perf_counter() - start) / args.steps)
    base = seconds["plain"]
    rows = [[name, f"{median(s) * 1e3:.2f}", f"{median([a / b for a, b in zip(s, base)]):.2f}"] for name, s in seconds.items()]
    result = {"model": args.model, "amp": args.amp, "batch": batch, "step_s": seconds,
              "profile_defaults": profile(steppers["defaults"], batches, device),
              "profile_plain": profile(steppers["plain"], batches, device)}
    print(f"step time by guard, {args.model} {args.amp} batch {batch} ({machine()})\n")
    print(table(["variant", "ms/step (median)", "x plain"], rows))
    for name in ("profile_defaults", "profile_plain"):
        p = result[name]
        print(f"\n{name}: per step {p['per_step_calls']}, kernel launches {p['kernel_launches_per_step']:.0f}")
        print(table(["op", "calls/step", "self CPU ms/step"], [[k, c, f"{t:.3f}"] for k, c, t in p["top_self_cpu"]]))
    print(f"wrote {save('gpu_guards', result)}")
    return result


if __name__ == "__main__":
    main()
