"""The per-worker part of `keel check`: the job's own components and `train_step`, fed the same global
batches in the same order whatever the world size (rank r takes the r-th slice of global batch t).

Trajectories, each from freshly built components:
- `run`: k steps; records per-step loss, grad norm and replica drift, every leaf module's output on
  the first batch, and the final state.
- with more than one worker, also `repeat` (the same k steps again: determinism) and `resume` (k/2
  steps, a real Keel checkpoint written and loaded into new components, the other k/2 steps).

The check's "epochs" are k/2 steps long: RNG is reseeded at each, as the real loop does per epoch,
which is where a Keel resume starts. Dropout is off (p = 0): its masks are drawn per rank, so with it
no N-worker run can equal the 1-worker run; any other layer that draws random numbers is reported.
"""

from __future__ import annotations

from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from orchestrator import metric_keys as mk
from orchestrator.data.preprocess import FEATURES, LABEL
from orchestrator.spec import JobSpec
from orchestrator.stability.distributed import rank, world_size
from orchestrator.stability.replica_check import replica_drift
from orchestrator.models import unwrap
from orchestrator.train.checkpointing import save_checkpoint
from orchestrator.train.resume import restore_agreed
from orchestrator.train.components import build_components, seed_everything
from orchestrator.train.loop import train_step


def dropout_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The dropout layers that drop anything (Keel's MLP has them at p = 0 by default: nothing to turn off,
    and the check's note said 'dropout off in 2 layer(s)' for a job without dropout)."""
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0]


def dropout_off(model: torch.nn.Module) -> int:
    """Dropout off (p = 0) in every layer that drops; how many it turned off, for the check's note."""
    layers = dropout_layers(model)
    for m in layers:
        m.p = 0.0
    return len(layers)


class FirstForward:
    """Every leaf module's output (batch-first tensors) during the model's first forward, by name."""

    def __init__(self, model: torch.nn.Module):
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in model.named_modules()
                        if name and not any(True for _ in m.children())]

    def _hook(self, name):
        def record(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(out, torch.Tensor) and name not in self.outputs:
                self.outputs[name] = out.detach().float().cpu().clone()
        return record

    def close(self) -> dict[str, torch.Tensor]:
        for h in self.handles:
            h.remove()
        return self.outputs


def fingerprint(state: dict) -> dict[str, list[float]]:
    """Per tensor (sum, sum of squares) in float64: cheap to compare across ranks."""
    return {k: [v.double().sum().item(), (v.double() ** 2).sum().item()] for k, v in state.items() if v.is_floating_point()}


def gradient_shares(model: torch.nn.Module, shares: dict[str, torch.Tensor]) -> None:
    """Per value of every parameter, its largest gradient so far as a share of the global gradient norm (this
    step's gradients, all-reduced): a share at rounding level marks a value the loss does not depend on."""
    named = [(n, p.grad.detach()) for n, p in unwrap(model).named_parameters() if p.grad is not None]
    if not named:
        return
    total = torch.stack([g.float().norm() for _, g in named]).norm().clamp_min(1e-30)
    for name, g in named:
        share = (g.float().abs() / total).cpu()
        shares[name] = torch.maximum(shares[name], share) if name in shares else share


def track_gradient_shares(comps) -> dict[str, torch.Tensor]:
    """gradient_shares at every optimizer step, filled in as training runs (the step zeroes the gradients after
    it: they are read just before the optimizer uses them, all-reduced and clipped)."""
    shares: dict[str, torch.Tensor] = {}
    model = comps.state.model
    comps.state.optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: gradient_shares(model, shares))
    return shares


def check_loop(config: dict) -> None:
    spec = JobSpec.model_validate(config["spec"])
    k, x, y, out = config["steps"], config["x"], config["y"], Path(config["out"])
    world, r, device = world_size(), rank(), ray.train.torch.get_device()
    per_rank = len(x) // k // world
    half = k // 2

    def batch(t: int) -> dict:
        lo = t * per_rank * world + r * per_rank
        # copies: the arrays arrive read-only from the object store, and torch warns on wrapping those
        return {FEATURES: torch.tensor(x[lo:lo + per_rank]), LABEL: torch.tensor(y[lo:lo + per_rank])}

    turned_off = []

    def fresh():
        comps = build_components(spec, config["steps_per_epoch"], device, ray.train.torch.prepare_model)
        turned_off.append(dropout_off(comps.state.model))
        return comps

    def steps(comps, start: int, stop: int, record: list | None = None) -> None:
        for t in range(start, stop):
            if t % half == 0:
                seed_everything(spec.run.seed, t // half, r)
            train_step(comps, batch(t), spec)
            if record is not None:
                st = comps.state
                record.append({mk.LOSS: st.global_loss, mk.GRAD_NORM: st.grad_norm_value, "skipped": st.skip,
                               "drift": replica_drift(st.model)})

    def final(comps) -> dict:
        return {k: v.detach().cpu().clone() for k, v in unwrap(comps.state.model).state_dict().items()}

    def save(tag: str, result: dict) -> None:
        if r != 0:
            result = {k: v for k, v in result.items() if k in ("fingerprint", "first_forward")}
        torch.save(result, out / f"{tag}-rank{r}.pt")

    comps = fresh()
    probe = FirstForward(unwrap(comps.state.model))
    record: list[dict] = []
    shares = track_gradient_shares(comps)
    steps(comps, 0, 1, record)
    first_forward = probe.close()
    steps(comps, 1, k, record)
    state = final(comps)
    save("run", {"steps": record, "state": state, "fingerprint": fingerprint(state), "first_forward": first_forward,
                 "gradient_shares": shares,
                 "dropout_layers": turned_off[0],
                 "modules": {n: type(m).__name__ for n, m in unwrap(comps.state.model).named_modules() if n}})
    if world > 1:
        comps = fresh()
        steps(comps, 0, k)
        save("repeat", {"state": final(comps)})
        comps = fresh()
        steps(comps, 0, half)
        shared = out / "checkpoint"  # one machine: every rank reads what rank 0 wrote
        if r == 0:
            shared.mkdir()
            save_checkpoint(shared, comps, epoch=0, spec_yaml=spec.to_yaml())
        dist.barrier()
        comps = fresh()
        restore_agreed([shared], comps, warn=print)  # the training loop's own resume: rank 0 decides
        steps(comps, half, k)
        save("resume", {"state": final(comps)})
    ray.train.report({"done": 1})
