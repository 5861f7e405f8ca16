"""The GPU path on one CUDA device.

1. Step throughput of Keel's own `train_step` (all guards on, rollback snapshots included) against a plain
   step a user writes (autocast, backward, optimizer step; GradScaler for fp16), on the same model, batch and
   optimizer, interleaved round by round: fp32, bf16 autocast, fp16 + GradScaler. Three models: the synthetic
   job's ResNet, a ResNet-18-sized one (both channels_last, 3x32x32), and a 100M-parameter transformer.
   Achieved TFLOP/s (3 x forward FLOPs, torch's FlopCounterMode) and MFU against the dense bf16 peak.
2. Code-path checks: the fp16 pre-clip norm is the unscaled one (equal to the fp32 step's on the same weights
   and batch, not 65536x it); batch norm after Keel's conversion is torch's native SyncBatchNorm on CUDA;
   a real `keel run` through Ray Train on the GPU (nccl) finishes.

    python -m benchmarks.gpu_path [--steps 30] [--rounds 3] [--models main,resnet18,transformer]
    python -m benchmarks.gpu_path --device cpu --steps 2 --batch 8 --models main   (smoke test of the code path)
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from benchmarks.common import machine, median, save, sync, table
from orchestrator.data.preprocess import FEATURES, LABEL
from orchestrator.spec import load_spec
from orchestrator.train.components import build_components
from orchestrator.train.loop import train_step

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "A10G": 125.0, "L4": 121.0, "V100": 125.0}
BASE_JOB = "jobs/synthetic-resnet.yaml"
NO_AUGMENT = ["data.augment.random_crop_padding=0", "data.augment.hflip=0", "data.preprocess.standardize=none"]
MODELS = {  # name: (overrides, batch); --batch and --channels change "main"
    "main": (["model.channels=[32,64,128]", "model.blocks_per_stage=1"], 256),
    "resnet18": (["model.channels=[64,128,256,512]", "model.blocks_per_stage=2"], 256),
    "transformer": (["model.kind=transformer", "model.width=1024", "model.layers=8", "model.heads=16",
                     "data.shape=[256,64]", *NO_AUGMENT], 32),
}


def peak_for(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def job(model: str, amp: str, batch: int, device: torch.device, extra=()):
    overrides, _ = MODELS[model]
    return load_spec(BASE_JOB, [*overrides, f"scaling.amp={amp}", f"data.batch_size={batch}", "scaling.num_workers=1",
                                f"scaling.use_gpu={'true' if device.type == 'cuda' else 'false'}", *extra])


def make_batches(spec, batch: int, device: torch.device, n: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    features = int(torch.tensor(spec.data.shape).prod())
    return [{FEATURES: torch.randn(batch, features, generator=g).to(device),
             LABEL: torch.randint(0, spec.data.num_classes, (batch,), generator=g).to(device)} for _ in range(n)]


class PlainStep:
    """What a user writes without Keel: the same model (fresh, same seed) and optimizer settings, no guards."""

    def __init__(self, spec, device: torch.device, amp_dtype):
        from orchestrator.models import build_model
        from orchestrator.train.components import seed_everything

        seed_everything(spec.run.seed)
        self.model = build_model(spec.model, spec.data).to(device)
        self.channels_last = device.type == "cuda" and spec.model.kind in ("cnn", "resnet")
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        o = spec.optimizer
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                                         weight_decay=spec.regularization.weight_decay)
        self.scaler = torch.amp.GradScaler(device.type) if spec.scaling.amp == "fp16" else None
        self.amp_dtype, self.shape, self.device = amp_dtype, spec.data.shape, device

    def __call__(self, batch: dict) -> None:
        x = batch[FEATURES].reshape(-1, *self.shape)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            loss = F.cross_entropy(self.model(x).float(), batch[LABEL])
        if self.scaler:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def warmup_steps(spec) -> int:
    return 3 * spec.stability.spike.snapshot_every + 2


def forward_flops(model: torch.nn.Module, spec, device: torch.device) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, *spec.data.shape, device=device)
    if spec.model.kind in ("cnn", "resnet") and device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def measure(model: str, amp: str, device: torch.device, steps: int, rounds: int, batch: int) -> dict:
    """Samples/s of Keel's step and the plain step, alternating round by round."""
    spec = job(model, amp, batch, device)  # Keel's defaults: every guard, rollback snapshots every 25 steps
    comps = build_components(spec, steps_per_epoch=100_000, device=device)
    plain = PlainStep(spec, device, comps.amp_dtype)
    batches = make_batches(spec, batch, device)
    variants = {"keel": lambda b: train_step(comps, b, spec), "plain": plain}
    for fn in variants.values():  # warm-up: cudnn autotuning, the allocator, and a full snapshot ring (its first
        for i in range(warmup_steps(spec)):  # copies allocate pinned memory; later ones reuse it, as in a long run)
            fn(batches[i % 4])
    sync(device)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            for i in range(steps):
                fn(batches[i % 4])
            sync(device)
            rates[name].append(batch * steps / (time.perf_counter() - start))
    flops_per_sample = 3 * forward_flops(plain.model, spec, device)
    ratios = [k / p for k, p in zip(rates["keel"], rates["plain"])]
    return {"model": model, "amp": amp, "batch": batch, "params": sum(p.numel() for p in plain.model.parameters()),
            "keel_samples_per_s": rates["keel"], "plain_samples_per_s": rates["plain"], "keel_over_plain": ratios,
            "keel_tflops": median(rates["keel"]) * flops_per_sample / 1e12,
            "plain_tflops": median(rates["plain"]) * flops_per_sample / 1e12}


def fp16_norm_check(device: torch.device, batch: int) -> dict:
    """One step from the same weights on the same batch in fp32 and in fp16 + GradScaler: Keel's pre-clip norm
    must be the same number (within fp16's rounding), not the scaled one (65536x at GradScaler's start)."""
    norms = {}
    for amp in ("none", "fp16"):
        spec = job("main", amp, batch, device)
        comps = build_components(spec, steps_per_epoch=1000, device=device)
        train_step(comps, make_batches(spec, batch, device, 1)[0], spec)
        norms[amp] = float(comps.state.grad_norm_value)
    return {"fp32_norm": norms["none"], "fp16_norm": norms["fp16"], "ratio": norms["fp16"] / norms["none"]}


def check_snapshots(device: torch.device, params: float = 50e6) -> dict:
    """Rollback snapshots of device state are the state as of the capture, though taken right after an
    update was queued (not yet run) and copied while the next forward and backward run (which also write the
    BN running statistics); a restore puts it back.
    The same updates run twice from one seed: once read synchronously (the reference), once snapshotted."""
    from benchmarks.snapshot_cost import synthetic
    from orchestrator.stability.snapshots import SnapshotRing, restore

    def host_state(state) -> dict:
        return {"model": {k: v.cpu() for k, v in state.model.state_dict().items()},
                "optimizer": [{k: v.cpu() for k, v in s.items() if torch.is_tensor(v)}
                              for s in state.optimizer.state_dict()["state"].values()]}

    def update(state, x) -> None:
        state.optimizer.zero_grad(set_to_none=True)
        state.model(x).square().mean().backward()
        state.optimizer.step()

    def same(a: dict, b: dict) -> bool:
        return (all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
                and all(torch.equal(s[k], t[k]) for s, t in zip(a["optimizer"], b["optimizer"]) for k in s))

    out = {}
    for mode, background in {"blocking": False, "background": True}.items():
        torch.manual_seed(0)
        state, x = synthetic(params, device, 512, batch_norm=True)
        update(state, x)
        sync(device)
        reference = host_state(state)  # after two updates
        torch.manual_seed(0)
        state, x = synthetic(params, device, 512, batch_norm=True)
        ring = SnapshotRing(3)
        update(state, x)  # queued, still running on the device when the snapshot is asked for
        ring.add(1, state, background=background)
        state.optimizer.zero_grad(set_to_none=True)
        state.model(x).square().mean().backward()  # the next step's compute, beside the copy
        ring.wait()  # as SpikeGuard.before_step, before the update
        state.optimizer.step()
        sync(device)
        snap = ring.pick(5, 1)[1]
        held = same(host_state_of(snap), reference)
        moved = not same(host_state(state), reference)
        restore(state, snap)
        out[mode] = {"snapshot_equals_state_at_capture": held, "state_moved_after": moved,
                     "restore_equals_state_at_capture": same(host_state(state), reference)}
    return out


def host_state_of(snap: dict) -> dict:
    return {"model": snap["model"], "optimizer": [{k: v for k, v in s.items() if torch.is_tensor(v)}
                                                  for s in snap["optimizer"]["state"].values()]}


def check_sync_batchnorm(device: torch.device) -> str:
    from orchestrator.models import build_model
    from orchestrator.stability.sync_batchnorm import convert_sync_batchnorm

    spec = load_spec(BASE_JOB, [])
    model = convert_sync_batchnorm(build_model(spec.model, spec.data), use_cuda=device.type == "cuda")
    kinds = {type(m).__name__ for m in model.modules() if "BatchNorm" in type(m).__name__}
    return ", ".join(sorted(kinds))


def nccl_run(rows: int) -> dict:
    import tempfile

    from orchestrator.data.generators import make_synthetic
    from orchestrator.train.driver import run_job

    workdir = tempfile.mkdtemp(prefix="keel-gpu-")
    make_synthetic(workdir, rows=rows, shape=(3, 32, 32))
    spec = load_spec(BASE_JOB, [
        f"data.train={workdir}/train.parquet", f"data.val={workdir}/val.parquet", f"run.storage_path={workdir}/runs",
        "scaling.use_gpu=true", "scaling.num_workers=1", "scaling.amp=bf16", "data.batch_size=256", "run.epochs=2"])
    start = time.perf_counter()
    outcome = run_job(spec, dashboard=False)  # as `keel run` without --dashboard
    return {"status": outcome.status, "val_accuracy": outcome.final.get("val_accuracy"), "rows": rows,
            "samples_per_s": outcome.final.get("samples_per_s"), "wall_s": time.perf_counter() - start,
            "backend": "nccl (TorchConfig, use_gpu)"}


def spread(xs: list[float]) -> str:
    return f"{median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=None, help="the main model's batch (default 256)")
    parser.add_argument("--channels", default=None, help="the main model's channels, e.g. [32,64,128]")
    parser.add_argument("--models", default="main,resnet18,transformer")
    parser.add_argument("--no-ray", action="store_true", help="skip the keel run through Ray Train")
    parser.add_argument("--checks-only", action="store_true", help="the code-path checks alone, no throughput")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_path: no CUDA device here (run it on a GPU machine, or --device cpu for a smoke test)")
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.channels:
        MODELS["main"] = ([f"model.channels={args.channels}", "model.blocks_per_stage=1"], MODELS["main"][1])
    amps = ("none", "bf16", "fp16") if device.type == "cuda" else ("none", "bf16")
    runs = []
    for model in ([] if args.checks_only else args.models.split(",")):
        batch = args.batch if (args.batch and model == "main") else MODELS[model][1]
        for amp in amps:
            runs.append(measure(model, amp, device, args.steps, args.rounds, batch))
            print(f"  {model} {amp}: keel/plain {spread(runs[-1]['keel_over_plain'])}", flush=True)
    peak = peak_for(name)
    for r in runs:
        r["keel_mfu"] = r["keel_tflops"] / peak if peak else None
        r["plain_mfu"] = r["plain_tflops"] / peak if peak else None
    result = {"device": name, "steps": args.steps, "rounds": args.rounds, "runs": runs, "peak_bf16_tflops": peak,
              "batchnorm_on_this_device": check_sync_batchnorm(device),
              "snapshots": check_snapshots(device, 50e6 if device.type == "cuda" else 1e6)}
    if device.type == "cuda":
        result["fp16_norm"] = fp16_norm_check(device, 64)
    if device.type == "cuda" and not (args.no_ray or args.checks_only):
        result["keel_run"] = nccl_run(8000)
    print(f"\nGPU path on {name}, {args.steps} steps x {args.rounds} rounds per variant ({machine()})\n")
    print(table(["model", "params", "batch", "amp", "keel samples/s", "plain samples/s", "keel/plain (range)",
                 "keel TFLOP/s", "keel MFU", "plain MFU"],
                [[r["model"], f"{r['params'] / 1e6:.1f}M", r["batch"], r["amp"], f"{median(r['keel_samples_per_s']):.0f}",
                  f"{median(r['plain_samples_per_s']):.0f}", spread(r["keel_over_plain"]), f"{r['keel_tflops']:.1f}",
                  f"{r['keel_mfu']:.1%}" if r["keel_mfu"] else "-", f"{r['plain_mfu']:.1%}" if r["plain_mfu"] else "-"]
                 for r in runs]))
    print(f"\nbatch norm after Keel's conversion: {result['batchnorm_on_this_device']}")
    print(f"rollback snapshots of this device's state: {result['snapshots']}")
    if "fp16_norm" in result:
        print(f"pre-clip norm, same weights and batch: {result['fp16_norm']}")
    if "keel_run" in result:
        print(f"keel run on the GPU through Ray Train: {result['keel_run']}")
    print(f"wrote {save('gpu_path', result)}")
    return result


if __name__ == "__main__":
    main()
