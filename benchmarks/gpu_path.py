"""The GPU path: the synthetic 3x32x32 ResNet job on one CUDA device.

1. Step throughput of Keel's own `train_step` (all guards on, channels_last) for fp32, bf16 autocast and
   fp16 + GradScaler (clipping after unscale), with samples/s, achieved TFLOP/s (3 x forward FLOPs,
   torch's FlopCounterMode) and MFU against the device's dense bf16 peak.
2. Code-path checks: torch's native SyncBatchNorm is what Keel converts to on CUDA; the fp16 scaler
   unscales before the clip (the clipped norm is the true one); a real `keel run` through Ray Train
   on the GPU uses the nccl backend and finishes.

    python -m benchmarks.gpu_path [--steps 50] [--batch 256]          (needs a CUDA device)
    python -m benchmarks.gpu_path --device cpu --steps 2 --batch 8     (smoke test of the code path)
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import machine, save, table
from orchestrator.data.preprocess import FEATURES, LABEL
from orchestrator.spec import load_spec
from orchestrator.train.components import build_components
from orchestrator.train.loop import train_step

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "A10G": 125.0, "L4": 121.0, "V100": 125.0}


def peak_for(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def measure(amp: str, device: torch.device, steps: int, batch: int, channels: str) -> dict:
    overrides = [f"scaling.amp={amp}", f"data.batch_size={batch}", f"model.channels={channels}", "scaling.num_workers=1",
                 f"scaling.use_gpu={'true' if device.type == 'cuda' else 'false'}", "stability.spike.action=rollback"]
    if device.type != "cuda" and amp == "fp16":
        return {}
    spec = load_spec("jobs/synthetic-resnet.yaml", overrides)
    comps = build_components(spec, steps_per_epoch=1000, device=device)
    g = torch.Generator().manual_seed(0)
    batches = [{FEATURES: torch.randn(batch, 3 * 32 * 32, generator=g).to(device),
                LABEL: torch.randint(0, 10, (batch,), generator=g).to(device)} for _ in range(4)]
    for i in range(3):  # warm-up: cudnn autotuning, allocator
        train_step(comps, batches[i % 4], spec)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        train_step(comps, batches[i % 4], spec)  # agree_step's .tolist() syncs every step, as in training
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        comps.state.model(batches[0][FEATURES][:1].reshape(1, 3, 32, 32).to(memory_format=torch.channels_last))
    flops = 3 * counter.get_total_flops() * batch * steps
    scaler_ok = None
    if comps.state.scaler is not None:  # the clip saw unscaled gradients: the pre-clip norm is a sane number
        scaler_ok = comps.state.grad_norm_value is not None and comps.state.grad_norm_value < 1e4
    return {"amp": amp, "samples_per_s": batch * steps / seconds, "tflops": flops / seconds / 1e12,
            "channels_last": comps.state.model.stem[0].weight.is_contiguous(memory_format=torch.channels_last),
            "scaler_unscaled_before_clip": scaler_ok}


def check_sync_batchnorm(device: torch.device) -> str:
    from orchestrator.models import build_model
    from orchestrator.stability.sync_batchnorm import convert_sync_batchnorm

    spec = load_spec("jobs/synthetic-resnet.yaml", [])
    model = convert_sync_batchnorm(build_model(spec.model, spec.data), use_cuda=device.type == "cuda")
    kinds = {type(m).__name__ for m in model.modules() if "BatchNorm" in type(m).__name__}
    return ", ".join(sorted(kinds))


def nccl_run(steps_rows: int) -> dict:
    import tempfile

    from orchestrator.data.generators import make_synthetic
    from orchestrator.train.driver import run_job

    workdir = tempfile.mkdtemp(prefix="keel-gpu-")
    make_synthetic(workdir, rows=steps_rows, shape=(3, 32, 32))
    spec = load_spec("jobs/synthetic-resnet.yaml", [
        f"data.train={workdir}/train.parquet", f"data.val={workdir}/val.parquet", f"run.storage_path={workdir}/runs",
        "scaling.use_gpu=true", "scaling.num_workers=1", "scaling.amp=bf16", "run.epochs=2"])
    outcome = run_job(spec)
    return {"status": outcome.status, "val_accuracy": outcome.final.get("val_accuracy"),
            "samples_per_s": outcome.final.get("samples_per_s"), "backend": "nccl (TorchConfig: use_gpu)"}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--channels", default="[32,64,128]")
    parser.add_argument("--no-ray", action="store_true", help="skip the keel run through Ray Train")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_path: no CUDA device here (run it on a GPU machine, or --device cpu for a smoke test)")
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    runs = [r for r in (measure(amp, device, args.steps, args.batch, args.channels) for amp in ("none", "bf16", "fp16")) if r]
    peak = peak_for(name)
    for r in runs:
        r["mfu"] = r["tflops"] / peak if peak else None
    result = {"device": name, "batch": args.batch, "steps": args.steps, "runs": runs, "peak_bf16_tflops": peak,
              "batchnorm_on_this_device": check_sync_batchnorm(device)}
    if device.type == "cuda" and not args.no_ray:
        result["keel_run"] = nccl_run(4000)
    print(f"GPU path on {name}: synthetic ResNet {args.channels}, batch {args.batch}, {args.steps} steps ({machine()})\n")
    print(table(["amp", "samples/s", "TFLOP/s", "MFU", "channels_last", "fp16 unscale before clip"],
                [[r["amp"], f"{r['samples_per_s']:.0f}", f"{r['tflops']:.2f}", f"{r['mfu']:.1%}" if r["mfu"] else "-",
                  r["channels_last"], r["scaler_unscaled_before_clip"]] for r in runs]))
    print(f"\nbatch norm after Keel's conversion: {result['batchnorm_on_this_device']}")
    if "keel_run" in result:
        print(f"keel run on the GPU through Ray Train: {result['keel_run']}")
    print(f"wrote {save('gpu_path', result)}")
    return result


if __name__ == "__main__":
    main()
