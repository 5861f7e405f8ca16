"""Everything a worker builds before its first step, from the job spec."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from orchestrator.data.preprocess import FEATURES
from orchestrator.models import build_model
from orchestrator.spec import JobSpec
from orchestrator.storage import is_remote
from orchestrator.stability.bad_batches import BadBatches
from orchestrator.stability.clipping import GradClipper
from orchestrator.stability.collapse import CollapseRecovery
from orchestrator.stability.diagnostics import Diagnostics
from orchestrator.stability.distributed import broadcast_object, rank, world_size
from orchestrator.stability.early_stopping import EarlyStopping
from orchestrator.stability.faults import FaultInjector
from orchestrator.stability.nonfinite import NonFiniteGuard
from orchestrator.stability.replica_check import ReplicaCheck
from orchestrator.stability.spikes import SpikeGuard
from orchestrator.stability.sync_batchnorm import convert_sync_batchnorm
from orchestrator.models import unwrap
from orchestrator.train.hooks import Safeguards, StepState
from orchestrator.train.optim import build_optimizer, split_decay_parameters
from orchestrator.train.schedules import Schedule, build_schedule
from orchestrator.train.warm_start import freeze


def seed_everything(seed: int, epoch: int = 0, rank_: int = 0) -> None:
    """Reseed from (seed, epoch, rank) at every epoch start: a resume replays the same RNG stream
    without storing generator states, and ranks draw different dropout masks."""
    s = (seed * 1_000_003 + epoch * 1_009 + rank_) % (2**31)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


@dataclass
class Components:
    state: StepState     # also the training state: model, optimizer, schedule, scaler
    safeguards: Safeguards
    clipper: GradClipper  # called by name in train_step; its state travels with the safeguards'
    penalized: list  # parameters under the L1/L2 penalty
    amp_dtype: torch.dtype | None
    unused_parameters: tuple[str, ...] = ()  # DDP searches for them every step (scaling.find_unused_parameters)

    @property
    def schedule(self) -> Schedule:
        return self.state.schedule


def classifier_params(model: torch.nn.Module) -> set[int]:
    """ids of the final Linear layer's parameters (AGC leaves the classifier alone)."""
    linears = [m for m in unwrap(model).modules() if isinstance(m, torch.nn.Linear)]
    return {id(p) for p in linears[-1].parameters()} if linears else set()


def chance_loss(spec: JobSpec) -> float | None:
    """The training loss of a uniform prediction, for the report's collapse watch: ln(classes) under cross-entropy
    (label smoothing and soft targets included); None for the losses that have no such level."""
    return math.log(spec.data.num_classes) if spec.loss.kind == "cross_entropy" and spec.data.num_classes >= 2 else None


def build_safeguards(spec: JobSpec, model: torch.nn.Module) -> Safeguards:
    """The safeguards in hook order: faults first (they simulate the world), then measurement,
    then the guards that decide, then the ones that only watch."""
    stab = spec.stability
    guards = [FaultInjector(spec.faults, FEATURES)]
    if stab.remember_bad_batches:
        local = not is_remote(spec.run.storage_path)  # a path rank 0 can write; object storage: checkpoints only
        guards.append(BadBatches(Path(spec.run.storage_path) / spec.run.name if local else None))
    guards.append(GradClipper(stab.clip, classifier_params(model), model))
    if stab.diagnostics.enabled:
        guards.append(Diagnostics(model, stab.diagnostics.every, chance_loss=chance_loss(spec)))
    if stab.nonfinite.enabled:
        guards.append(NonFiniteGuard(stab.nonfinite.max_consecutive_skips, stab.nonfinite.max_batch_scale_ratio))
    if stab.spike.enabled:
        guards.append(SpikeGuard(stab.spike, clipped=stab.clip.mode != "none", chance_loss=chance_loss(spec)))
    if stab.collapse.action == "rollback" and chance_loss(spec) is not None:  # the default; other losses: no level
        guards.append(CollapseRecovery(chance_loss(spec), stab.collapse))
    guards.append(ReplicaCheck())
    es = stab.early_stopping
    if es.enabled:
        guards.append(EarlyStopping(es.metric, es.mode, es.patience, es.min_delta, es.divergence_threshold, es.check_finite))
    return Safeguards(guards)


def build_components(spec: JobSpec, steps_per_epoch: int, device: torch.device, prepare_model=None) -> Components:
    """Model (synchronized BN, then DDP through `prepare_model`), optimizer, schedule, scaler, safeguards."""
    seed_everything(spec.run.seed)  # identical init on every rank (DDP also broadcasts rank 0's)
    model = build_model(spec.model, spec.data)
    # rank 0's verdict for every rank: DDP wrapped with the search on some ranks and not others would not agree
    unused = broadcast_object(unused_parameters(spec, model) if rank() == 0 else None) if prepare_model else []
    if spec.stability.sync_batchnorm and world_size() > 1:
        model = convert_sync_batchnorm(model, use_cuda=device.type == "cuda")
    if spec.init_from.freeze:  # before DDP wraps the model: every rank leaves the same parameters out
        freeze(model, spec.init_from.freeze)
    if spec.scaling.use_gpu and spec.model.kind in ("cnn", "resnet"):
        model = model.to(memory_format=torch.channels_last)
    if prepare_model and (unused or spec.scaling.find_unused_parameters is True):
        model = prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    else:
        model = prepare_model(model) if prepare_model else model.to(device)
    optimizer = build_optimizer(model, spec.optimizer, spec.regularization, world_size(), spec.init_from.lr_multipliers)
    schedule = build_schedule(optimizer, spec.schedule, steps_per_epoch, spec.run.epochs)
    scaler = torch.amp.GradScaler(device.type) if spec.scaling.amp == "fp16" else None
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[spec.scaling.amp]
    penalized, _ = split_decay_parameters(model, spec.regularization.exclude_norm_and_bias)
    state = StepState(model=model, optimizer=optimizer, device=device, rank=rank(), scaler=scaler, schedule=schedule)
    safeguards = build_safeguards(spec, model)
    return Components(state, safeguards, safeguards.find(GradClipper), penalized, amp_dtype, tuple(unused))


def unused_parameters(spec: JobSpec, model: torch.nn.Module) -> list[str]:
    """A custom model's parameters that get no gradient (scaling.find_unused_parameters: auto); Keel's own
    models use every parameter."""
    if spec.scaling.find_unused_parameters != "auto" or spec.model.kind != "custom":
        return []
    from orchestrator.models.custom import parameters_without_gradient

    return parameters_without_gradient(model, spec.data.shape, tuple(spec.init_from.freeze))


def unused_note(names) -> str:
    shown = ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")
    return (f"the model's {shown} get no gradient in its forward: DDP searches for unused parameters at every step "
            "(slower); remove or freeze them (init_from.freeze) to spare it")
