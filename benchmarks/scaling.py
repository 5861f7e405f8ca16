"""Scaling model: measured step compute and all-reduce at 1 and 2 workers, projected to 8/64/512 GPUs.

Measured here (gloo, one CPU thread per worker, the main job's ResNet, batch B per worker):
  t_step(1)      one worker's forward + backward + optimizer step;
  t_step(2)      the same under DDP with 2 workers (compute + gradient all-reduce);
  t_allreduce(2) an all-reduce of the gradient bytes S on its own.

Projection (no overlap of communication with backward, so a lower bound on efficiency):
  t_comm(N)  = 2 (N-1)/N * S / BW  +  2 log2(N) * alpha       (bandwidth term of a ring all-reduce,
                                                                latency term of NCCL's tree for small S)
  t_step(N)  = t_compute + t_comm(N)
  efficiency = t_compute / t_step(N);  samples/s = N * B / t_step(N)
t_compute on a GPU is not measured here (no GPU in this run): it is the model's FLOPs per step
(3 x forward, counted by torch's FlopCounterMode) at an assumed achieved rate, floored by an assumed
per-step launch overhead. All assumptions are printed and written to the JSON.

    python -m benchmarks.scaling [--batch B] [--steps N] [--bandwidth-gbit 25] [--alpha-us 30]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from benchmarks.common import gloo_group, machine, median, save, start_ranks, table
from orchestrator.models import build_model
from orchestrator.spec import load_spec


def main_job_model():
    spec = load_spec("jobs/digits-resnet.yaml", [])
    return build_model(spec.model, spec.data), spec


def step_times(model, batch: int, steps: int, shape, ddp: bool) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    times = []
    for i in range(steps + 3):
        start = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if i >= 3:  # warm-up steps excluded
            times.append(time.perf_counter() - start)
    return times


def worker(rank: int, world: int, init_file: str, batch: int, steps: int, out) -> None:
    torch.set_num_threads(1)
    with gloo_group(rank, world, f"file://{init_file}"):
        measured = measure_two_workers(batch, steps)
    if rank == 0:
        out.put(measured)


def measure_two_workers(batch: int, steps: int) -> dict:
    torch.manual_seed(0)
    model, spec = main_job_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    t_ddp = step_times(ddp, batch, steps, spec.data.shape, ddp=True)
    grads = torch.zeros(sum(p.numel() for p in model.parameters()))
    t_ar = []
    for i in range(steps + 3):
        start = time.perf_counter()
        dist.all_reduce(grads)
        if i >= 3:
            t_ar.append(time.perf_counter() - start)
    return {"t_step2": median(t_ddp), "t_allreduce2": median(t_ar)}


def project(t_compute: float, grad_bytes: float, batch: int, bandwidth: float, alpha: float, n: int) -> dict:
    t_comm = 2 * (n - 1) / n * grad_bytes / bandwidth + (2 * math.log2(n) * alpha if n > 1 else 0.0)
    t_step = t_compute + t_comm
    return {"gpus": n, "t_comm_ms": t_comm * 1e3, "t_step_ms": t_step * 1e3, "efficiency": t_compute / t_step,
            "samples_per_s": n * batch / t_step}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32, help="per worker")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--bandwidth-gbit", type=float, default=25.0, help="per-GPU interconnect (g5.xlarge: 25 Gbit/s)")
    parser.add_argument("--alpha-us", type=float, default=30.0, help="per-hop latency")
    parser.add_argument("--gpu-tflops", type=float, default=40.0, help="achieved bf16 TFLOP/s (A10G: ~32%% of 125 peak)")
    parser.add_argument("--launch-floor-ms", type=float, default=3.0, help="per-step kernel-launch floor of a small net")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, spec = main_job_model()
    t_step1 = median(step_times(model, args.batch, args.steps, spec.data.shape, ddp=False))
    params = sum(p.numel() for p in model.parameters())
    grad_bytes = params * 4
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, *spec.data.shape))
    flops_per_step = 3 * counter.get_total_flops() * args.batch
    out = mp.get_context("forkserver").Queue()
    init_file = os.path.join(tempfile.mkdtemp(prefix="keel-scaling-"), "init")
    start_ranks(worker, (2, init_file, args.batch, args.steps, out), 2, ["orchestrator.models", "benchmarks.scaling"])
    measured = {"t_step1": t_step1, **out.get()}
    bandwidth, alpha = args.bandwidth_gbit * 1e9 / 8, args.alpha_us * 1e-6
    t_gpu = max(flops_per_step / (args.gpu_tflops * 1e12), args.launch_floor_ms * 1e-3)
    projection = [project(t_gpu, grad_bytes, args.batch, bandwidth, alpha, n) for n in (1, 8, 64, 512)]
    # the model's own check on this machine: t_step(2) ~ t_step(1) + t_allreduce(2)
    predicted2 = {"t_step_ms": (t_step1 + measured["t_allreduce2"]) * 1e3}
    print(f"scaling model, main job ResNet ({params:,} parameters, {grad_bytes / 1e6:.2f} MB of gradients), "
          f"batch {args.batch}/worker ({machine()})\n")
    print(table(["measured (CPU, gloo)", "ms"], [["step, 1 worker", f"{t_step1 * 1e3:.1f}"],
                                                 ["step, 2 workers (DDP)", f"{measured['t_step2'] * 1e3:.1f}"],
                                                 ["all-reduce of the gradients, 2 workers", f"{measured['t_allreduce2'] * 1e3:.2f}"],
                                                 ["model: t_step1 + t_allreduce2", f"{predicted2['t_step_ms']:.1f}"]]))
    print(f"\nprojection: {flops_per_step / 1e9:.2f} GFLOP/step at {args.gpu_tflops:g} TFLOP/s, floor {args.launch_floor_ms:g} ms "
          f"-> t_compute {t_gpu * 1e3:.2f} ms; BW {args.bandwidth_gbit:g} Gbit/s, alpha {args.alpha_us:g} us\n")
    print(table(["GPUs", "t_comm ms", "t_step ms", "efficiency", "samples/s"],
                [[p["gpus"], f"{p['t_comm_ms']:.2f}", f"{p['t_step_ms']:.2f}", f"{p['efficiency']:.0%}", f"{p['samples_per_s']:,.0f}"]
                 for p in projection]))
    result = {"params": params, "grad_bytes": grad_bytes, "batch": args.batch, "measured": measured,
              "model_check_step2_ms": predicted2["t_step_ms"], "flops_per_step": flops_per_step,
              "assumptions": {"bandwidth_gbit": args.bandwidth_gbit, "alpha_us": args.alpha_us, "gpu_tflops": args.gpu_tflops,
                              "launch_floor_ms": args.launch_floor_ms}, "projection": projection}
    print(f"wrote {save('scaling', result)}")
    return result


if __name__ == "__main__":
    main()
