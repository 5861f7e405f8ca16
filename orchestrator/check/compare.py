"""What `keel check` compares, as plain functions of the runs' saved results (no Ray, no processes).

`one` is the 1-worker run's rank-0 result; `many` maps each N-worker trajectory (run, repeat, resume)
to its per-rank results. Each comparison gives a CheckLine; the first failing one names the step and
the layer where the runs first differed, and `likely_cause` says what usually does that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from orchestrator import metric_keys as mk

# N ranks sum in another order than one: fp32 results differ at ~1e-6 relative (measured on the main
# job: step-0 outputs 8e-7, losses 5e-7, grad norms 1e-5 over 20 steps), and training amplifies that in
# the parameters (4e-4 after 20 steps). A real sync bug (per-rank BN, a rank-dependent layer) shows at
# 1e-2 and above from the first step.
EQUIVALENCE_RTOL = 1e-3
PARAMETER_RTOL = 1e-2
# A value whose gradient stays below this share of the global gradient norm at every step gets rounding noise
# for a gradient: the loss does not depend on it. A key bias before softmax adds the same logit to every key.
# Largest share over 20 Adam steps, measured: 1.2e-9 for the key third of nn.MultiheadAttention's
# in_proj_bias, 1.0e-9 for the shipped transformer's k_norm.bias, 1.2e-8 for a bare attention without any
# normalisation; the smallest real value 3.4e-4 and 1.7e-4. Adam scales that noise up to full-size steps,
# different on 1 and N workers, so those values are not compared.
NOISE_GRADIENT_SHARE = 1e-6
# The same world size, the same inputs: only a nondeterministic op or unseeded randomness differs.
EXACT_RTOL = 1e-6
BATCH_NORMS = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d")


@dataclass
class CheckLine:
    name: str
    ok: bool
    detail: str
    cause: Optional[str] = None


@dataclass
class CheckReport:
    lines: list[CheckLine] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(line.ok for line in self.lines)

    @property
    def first_failure(self) -> Optional[CheckLine]:
        return next((line for line in self.lines if not line.ok), None)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if a.shape != b.shape:
        return float("inf")
    scale = max(b.abs().max().item() if b.numel() else 0.0, 1e-8)
    return (a - b).abs().max().item() / scale if a.numel() else 0.0


def first_differing(a: dict, b: dict, rtol: float, left_out: Optional[dict] = None) -> tuple[Optional[str], float]:
    """The first tensor (in a's order: registration, or execution for outputs) beyond rtol; and the max error.
    `left_out`: per tensor, a mask of the values not to compare."""
    first, worst = None, 0.0
    for name, value in a.items():
        if name not in b or not value.is_floating_point():
            continue
        other = b[name]
        if left_out and name in left_out and value.shape == other.shape:
            keep = ~left_out[name]
            value, other = value[keep], other[keep]
        err = relative_error(value, other)
        worst = max(worst, err)
        if err > rtol and first is None:
            first = name
    return first, worst


def layer_of(tensor_name: str) -> str:
    return tensor_name.rsplit(".", 1)[0] if "." in tensor_name else tensor_name


def likely_cause(layer: str, kind: str, modules: dict[str, str]) -> str:
    """What usually makes this layer differ between 1 worker x N*b and N workers x b."""
    module = modules.get(layer, "")
    if module in BATCH_NORMS:
        return (f"{layer} ({module}) normalises each rank's batch alone: set stability.sync_batchnorm: true "
                "(Keel then synchronizes it)")
    if kind == "forward":
        return (f"{layer} ({module or 'layer'}) computes something that depends on the rank or on the per-rank "
                "batch: random numbers drawn per rank, or statistics over the batch")
    return f"{layer} ({module or 'tensor'}) is updated differently: look at what it depends on besides its gradient"


def compare_forward(one: dict, ranks: list[dict], modules: dict[str, str]) -> CheckLine:
    """Step 0's leaf-module outputs: the N ranks' slices, concatenated, against the 1-worker batch."""
    joined = {}
    for name in one["first_forward"]:
        parts = [r["first_forward"].get(name) for r in ranks]
        if all(p is not None for p in parts):
            try:
                whole = torch.cat(parts, 0)
            except RuntimeError:  # not batch-first: nothing to compare by slices
                continue
            if whole.shape == one["first_forward"][name].shape:  # (T, B, H) joined on dim 0 is not the batch
                joined[name] = whole
    first, worst = first_differing(one["first_forward"], joined, EQUIVALENCE_RTOL)
    if first is None:
        return CheckLine("forward, step 0 (every layer)", True, f"max rel. error {worst:.1e} over {len(joined)} layers")
    return CheckLine("forward, step 0 (every layer)", False, f"first differs at {first} ({modules.get(first, '?')})",
                     likely_cause(first, "forward", modules))


def compare_series(name: str, key: str, one: list[dict], many: list[dict]) -> CheckLine:
    for t, (a, b) in enumerate(zip(one, many)):
        err = abs(a[key] - b[key]) / max(abs(a[key]), 1e-8)
        if not err <= EQUIVALENCE_RTOL:  # NaN counts as a difference
            return CheckLine(name, False, f"first differs at step {t}: {a[key]:.6g} (1 worker) vs {b[key]:.6g}",
                             "the loss or gradients are combined differently across ranks (a loss that is not a "
                             "per-sample mean, a penalty scaled by the world size, or a rank-local skip)")
    worst = max((abs(a[key] - b[key]) / max(abs(a[key]), 1e-8) for a, b in zip(one, many)), default=0.0)
    return CheckLine(name, True, f"{len(one)} steps, max rel. error {worst:.1e}")


def compare_states(name: str, a: dict, b: dict, rtol: float, cause: str, modules: dict[str, str],
                   shares: Optional[dict[str, torch.Tensor]] = None) -> CheckLine:
    """`shares`: per parameter value, its largest gradient share (1-worker run); those at rounding level are
    left out, and named."""
    left_out = {n: share <= NOISE_GRADIENT_SHARE for n, share in (shares or {}).items()}
    left_out = {n: mask for n, mask in left_out.items() if mask.any()}
    named = [n if mask.all() else f"{n} ({int(mask.sum())} of {mask.numel()} values)" for n, mask in left_out.items()]
    said = (f"; not compared, their gradient is rounding noise (the loss does not depend on them): "
            f"{', '.join(named[:3])}{', ...' if len(named) > 3 else ''}") if named else ""
    first, worst = first_differing(a, b, rtol, left_out)
    if first is None:
        return CheckLine(name, True, f"max rel. error {worst:.1e} (tolerance {rtol:g}){said}")
    layer = layer_of(first)
    return CheckLine(name, False, f"first differs at {first} ({modules.get(layer, '?')}): rel. error {worst:.1e}",
                     cause.format(layer=layer, module=modules.get(layer, "?")))


def compare_replicas(ranks: list[dict], run_steps: list[dict], modules: dict[str, str]) -> CheckLine:
    drift = [s["drift"] for s in run_steps]
    bad_step = next((t for t, d in enumerate(drift) if not d == 0.0), None)
    if bad_step is not None:
        return CheckLine("replicas identical, every step", False, f"parameters differ across ranks from step {bad_step}",
                         "ranks stepped differently: a parameter outside DDP, or a decision a rank took alone")
    reference = ranks[0]["fingerprint"]
    for r, other in enumerate(ranks[1:], start=1):
        for name, value in reference.items():
            if other["fingerprint"].get(name) != value:
                layer = layer_of(name)
                return CheckLine("replicas identical, every step", False,
                                 f"{name} differs between rank 0 and rank {r} after {len(run_steps)} steps",
                                 likely_cause(layer, "buffer", modules))
    return CheckLine("replicas identical, every step", True, f"drift 0 at all {len(drift)} steps; buffers equal")


def compare(one: dict, many: dict[str, list[dict]], data_deterministic: bool) -> CheckReport:
    run = many["run"]
    modules = run[0]["modules"]
    lines = [CheckLine("data pipeline deterministic", data_deterministic,
                       "two reads of the first batches are identical" if data_deterministic else "two reads differ",
                       None if data_deterministic else "augmentation or shuffling is not seeded by (run.seed, epoch)"),
             compare_forward(one, run, modules),
             compare_series("loss, every step", mk.LOSS, one["steps"], run[0]["steps"]),
             compare_series("global grad norm, every step", mk.GRAD_NORM, one["steps"], run[0]["steps"]),
             compare_states("parameters and buffers after k steps", one["state"], run[0]["state"], PARAMETER_RTOL,
                            "{layer} ({module}) ends different: see the first step that differed above", modules,
                            one.get("gradient_shares")),
             compare_replicas(run, run[0]["steps"], modules)]
    if "repeat" in many:
        lines.append(compare_states("determinism (the same run twice)", run[0]["state"], many["repeat"][0]["state"],
                                    EXACT_RTOL, "{layer} ({module}) differs between identical runs: unseeded randomness "
                                    "or a nondeterministic op", modules))
    if "resume" in many:
        lines.append(compare_states("resume at k/2 from a Keel checkpoint", run[0]["state"], many["resume"][0]["state"],
                                    EXACT_RTOL, "{layer} ({module}): resuming did not continue exactly; state the "
                                    "checkpoint does not carry (model, optimizer, schedule, guards)", modules))
    return CheckReport(lines)
