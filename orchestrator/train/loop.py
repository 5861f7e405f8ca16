"""The per-worker training loop. Read it top to bottom; hooks.py shows where safeguards act."""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F

from orchestrator import metric_keys as mk
from orchestrator.data.batches import row_bytes, shard_batches
from orchestrator.data.preprocess import FEATURES, LABEL
from orchestrator.models import unwrap
from orchestrator.spec import JobSpec
from orchestrator.stability.diagnostics import Diagnostics
from orchestrator.stability.distributed import all_reduce_, broadcast_buffers, rank as this_rank, world_size
from orchestrator.stability.faults import FaultInjector
from orchestrator.train.checkpointing import save_checkpoint
from orchestrator.train.components import Components, build_components, seed_everything, unused_note
from orchestrator.train.meters import EpochMeter, ProgressSender
from orchestrator.train.losses import sample_losses, without_worst
from orchestrator.train.in_process import report_epoch
from orchestrator.train.resume import latest_checkpoint, resume
from orchestrator.train.optim import weight_penalty
from orchestrator.train.warm_start import warm_start
from orchestrator.train.worker_config import WorkerConfig, steps_for


def to_inputs(batch: dict, data_spec, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pipeline columns to model inputs; labels are class indices, or probabilities (one-hot, mixup)."""
    x = batch[FEATURES].to(device, non_blocking=True).float()
    y = batch[LABEL].to(device, non_blocking=True)
    y = y.float() if y.dim() == 2 else y.long()
    return x.reshape(x.shape[0], *data_spec.shape), y


def hard_labels(y: torch.Tensor) -> torch.Tensor:
    return y.argmax(1) if y.dim() == 2 else y


def agree_step(st, losses: torch.Tensor) -> None:
    """ONE all-reduce per step of [loss*n, n, non-finite?, grad norm, BN outlier?, the loss without each rank's
    worst sample (sum, count)]: the losses every rank reports and the skip decision every rank takes.
    `losses`: this rank's per-sample losses (detached). `.tolist()` is the step's host sync."""
    def on_device(value) -> torch.Tensor:
        """A number (or a CPU scalar tensor) as a scalar on the device, filled by a kernel: `torch.tensor(...,
        device=cuda)` and `.to(cuda)` copy from pageable host memory, and each such copy syncs the host."""
        if isinstance(value, torch.Tensor) and (value.device.type != "cpu" or st.device.type == "cpu"):
            return value  # already where the all-reduce runs (cuda vs cuda:0 compare unequal: types are compared)
        return torch.full((), float(value), device=st.device)  # float() of a CPU tensor reads host memory only

    zero, n = on_device(0.0), losses.numel()
    norm = st.grad_norm if st.grad_norm is not None else zero
    bad = (~torch.isfinite(st.loss)) | (~torch.isfinite(norm))
    outlier = on_device(st.batch_outlier) if st.batch_outlier is not None else zero  # from a CPU batch: a CPU tensor
    rest_sum, rest_n = without_worst(losses)
    stats = torch.stack([st.loss.float() * n, on_device(n), bad.float(), norm.float(), outlier.float(), rest_sum.float(),
                         on_device(rest_n)])
    loss_sum, count, nonfinite, norm_sum, outliers, rest_sum, rest_count = all_reduce_(stats).tolist()
    st.global_loss, st.global_nonfinite, st.grad_norm_value = loss_sum / count, nonfinite, norm_sum / world_size()
    st.global_outlier = outliers
    st.global_loss_typical = rest_sum / rest_count if rest_count else st.global_loss


def worker_placement() -> list[dict]:
    """Where every rank runs (Ray node, host, pid, CPU niceness): one all_gather_object at start-up, for placement.json."""
    import os
    import socket

    import torch.distributed as dist

    me = {"rank": this_rank(), "node": ray.get_runtime_context().get_node_id(),
          "host": socket.gethostname(), "pid": os.getpid(),
          "niceness": os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else None}
    if world_size() == 1:
        return [me]
    everyone: list = [None] * world_size()
    dist.all_gather_object(everyone, me)
    return everyone


def train_step(comps: Components, batch: dict, spec: JobSpec) -> None:
    st, guards, reg = comps.state, comps.safeguards, spec.regularization
    st.begin_step()
    batch = guards.on_batch(st, batch)
    if batch is None:  # dropped on every rank (e.g. the batches after a rollback)
        st.step += 1
        return
    x, y = to_inputs(batch, spec.data, st.device)
    with torch.autocast(st.device.type, dtype=comps.amp_dtype, enabled=comps.amp_dtype is not None):
        losses = sample_losses(st.model(x).float(), y, spec.loss)
    loss = losses.mean()
    st.loss = loss.detach()
    total = loss + weight_penalty(comps.penalized, reg.l1, reg.l2)
    (st.scaler.scale(total) if st.scaler else total).backward()
    comps.clipper.clip(st)  # AMP unscale, the pre-clip global norm (st.grad_norm), then clip by stability.clip
    guards.call("after_backward", st)
    agree_step(st, losses.detach())  # reads st.grad_norm (clip) and st.batch_outlier (NonFiniteGuard's on_batch)
    guards.decide(st)  # before_step hooks; a skip also puts back the BN statistics this forward wrote
    if not st.skip:
        with lr_scaled(st.optimizer, st.lr_scale):
            st.scaler.step(st.optimizer) if st.scaler else st.optimizer.step()
        comps.schedule.step()
    if st.scaler:
        st.scaler.update()  # also after a skip: an fp16 overflow must lower the scale
    st.optimizer.zero_grad(set_to_none=True)
    guards.call("after_step", st)
    st.step += 1


@contextmanager
def lr_scaled(optimizer, scale: float):
    """Step at lr x scale, then put the scheduled LR back (torch's schedulers chain on group['lr'])."""
    if scale == 1.0:
        yield
        return
    saved = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = g["lr"] * scale
    try:
        yield
    finally:
        for g, lr in zip(optimizer.param_groups, saved):
            g["lr"] = lr


@torch.no_grad()
def evaluate(comps: Components, shard, spec: JobSpec) -> dict[str, float]:
    """Validation loss/accuracy over all ranks' shards (sums all-reduced: every rank gets the same numbers)."""
    st = comps.state
    # Not DDP's forward: its first call after a training step broadcasts rank 0's buffers, a collective that a
    # rank with no batch in its share of the split never joins (a 1-row split on 2 workers hung the run).
    model = unwrap(st.model)
    broadcast_buffers(model)  # on every rank instead: all evaluate with rank 0's BN statistics, as DDP's gave
    model.eval()  # BN uses running statistics: no collective per batch, uneven shards are fine
    sums = torch.zeros(3, device=st.device, dtype=torch.float64)
    faults = comps.safeguards.find(FaultInjector)
    for batch in shard_batches(shard, spec.data.batch_size * 4, row_bytes=row_bytes(spec.data), drop_last=False):
        x, y = to_inputs(batch, spec.data, st.device)
        x = faults.eval_inputs(st, x) if faults else x
        with torch.autocast(st.device.type, dtype=comps.amp_dtype, enabled=comps.amp_dtype is not None):
            logits = model(x).float()
        sums += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(),
                             (logits.argmax(1) == hard_labels(y)).sum().double(), torch.tensor(float(len(y)), device=st.device).double()])
    loss_sum, correct, count = all_reduce_(sums).tolist()
    model.train()
    return {mk.VAL_LOSS: loss_sum / max(count, 1), mk.VAL_ACCURACY: correct / max(count, 1)}


def stability_report(comps: Components, events: list[dict], metrics: dict) -> dict | None:
    diagnostics = comps.safeguards.find(Diagnostics)
    if diagnostics is None:
        return None
    counters = {k: metrics[k] for k in mk.COUNTERS if k in metrics}
    return {mk.STOP_REASON: metrics[mk.STOP_REASON], **diagnostics.report(events[-1000:], counters)}


def epoch_batches(config: WorkerConfig, train_shard, epoch: int, rank: int):
    """This rank's batches of `epoch`, whole batches only (no 1-sample BN batch)."""
    spec = config.spec
    if config.clock is not None:  # before this rank asks for the epoch's data: augmentation seeds, curriculum pool
        ray.get(config.clock.set.remote(epoch))
    return shard_batches(train_shard, spec.data.batch_size, row_bytes=row_bytes(spec.data), drop_last=True,
                         shuffle_rows=spec.data.shuffle_buffer, seed=spec.run.seed * 7919 + epoch * 31 + rank,
                         prefetch_batches=spec.data.prefetch_batches)


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point; `loop_config` carries one WorkerConfig (see train/worker_config.py)."""
    config = WorkerConfig.of(loop_config)
    spec, world = config.spec, world_size()
    # asked for first: the split's coordinator actor starts while this worker builds its model (was serial)
    train_shard, rank = ray.train.get_dataset_shard("train"), this_rank()
    val_shard = config.eval_shard("val", rank, world)
    extra_val = {name: config.eval_shard(f"val_{name}", rank, world) for name in spec.data.extra_val}
    steps_per_epoch = steps_for(config.epoch_rows, world, spec.data.batch_size)  # an elastic run: this group's size
    latest = latest_checkpoint(spec, config.storage, config.in_process)  # agreed by every rank
    prepare = None if config.in_process else ray.train.torch.prepare_model  # in process: one rank, no DDP
    comps = build_components(spec, max(steps_per_epoch), ray.train.torch.get_device(), prepare)
    st = comps.state
    progress = ProgressSender(config.progress, st.rank)
    if comps.unused_parameters:
        progress.send("warning", message=unused_note(comps.unused_parameters))
    placement = worker_placement()  # a collective: every rank takes part, rank 0 sends it
    progress.send("ready", world_size=world, placement=placement)
    start_epoch, resumed = resume(comps, spec, progress, latest, config.initial_checkpoint, steps_per_epoch, config.storage)
    warm = warm_start(st.model, spec) if resumed is None and start_epoch == 0 and spec.init_from.checkpoint else None
    all_events: list[dict] = []

    for epoch in range(start_epoch, spec.run.epochs):
        seed_everything(spec.run.seed, epoch, st.rank)
        st.epoch, meter, steps = epoch, EpochMeter(), steps_per_epoch[epoch]
        st.model.train()
        batches = epoch_batches(config, train_shard, epoch, st.rank)
        for i, batch in enumerate(meter.timed(batches)):
            if i == 0 and epoch == start_epoch:
                progress.send("first_batch")  # start-up breakdown: data pipeline up
            if i >= steps or st.stop_reason:
                continue  # drain the shard: every rank takes exactly `steps` (agreed) steps
            logged = i % spec.run.log_every == 0 or i == steps - 1
            st.want_post_clip_norm = logged
            train_step(comps, batch, spec)
            meter.add(st.global_loss, st.grad_norm_value, spec.data.batch_size * world)
            if logged:
                post = st.post_clip_norm.item() if st.post_clip_norm is not None else None
                progress.send("step", epoch=epoch, step=i + 1, steps=steps, **{
                    mk.GLOBAL_STEP: st.step - 1, mk.LOSS: st.global_loss, mk.GRAD_NORM: st.grad_norm_value,
                    mk.GRAD_NORM_POST_CLIP: post, mk.LR: st.optimizer.param_groups[0]["lr"]})

        metrics = {mk.EPOCH: epoch, mk.STEP: st.step, **meter.summary(), **evaluate(comps, val_shard, spec),
                   mk.LR: st.optimizer.param_groups[0]["lr"], mk.WORLD_SIZE: world}
        for name, shard in extra_val.items():  # e.g. the old data while fine-tuning: forgetting, epoch by epoch
            metrics.update({mk.extra_val(k, name): v for k, v in evaluate(comps, shard, spec).items()})
        if resumed and epoch == start_epoch:
            metrics[mk.RESUMED_FROM] = resumed  # {checkpoint, weight fingerprint, ranks}: also for sweep trials
        if warm and epoch == start_epoch:
            metrics[mk.INIT_FROM] = warm  # fine-tuning: the checkpoint, and the layers left to a fresh init
        end_epoch(comps, config, progress, metrics, all_events)
        st.events.clear()
        if st.stop_reason:
            break


def end_epoch(comps: Components, config: WorkerConfig, progress: ProgressSender, metrics: dict, all_events: list[dict]) -> None:
    """The epoch's tail on every rank: schedule and guards see the validated metrics, then one report
    (metrics, and from rank 0 a checkpoint unless the run diverged, plus the stability report at the end)."""
    st, spec, epoch = comps.state, config.spec, metrics[mk.EPOCH]
    comps.schedule.epoch_end(metrics[mk.VAL_LOSS], warmup_done=epoch + 1 >= spec.schedule.warmup)
    comps.safeguards.call("on_epoch_end", st, metrics)
    comps.safeguards.call("on_report", metrics)
    diverged = st.stop_reason is not None and st.stop_reason.diverged
    metrics.update({mk.STOP_REASON: str(st.stop_reason or ""), mk.DIVERGED: int(diverged), mk.EVENTS: st.events[-20:]})
    all_events.extend(st.events)
    last = epoch == spec.run.epochs - 1 or st.stop_reason is not None
    report = stability_report(comps, all_events, metrics) if last and st.rank == 0 else None
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if st.rank == 0 and not diverged and (last or (epoch + 1) % spec.run.checkpoint_every == 0):
            save_checkpoint(tmp, comps, epoch=epoch, spec_yaml=spec.to_yaml(), extra={"preprocess": config.preprocess, "data_reference": config.data_reference})
            if report is not None:
                (Path(tmp) / "stability_report.json").write_text(json.dumps(report, indent=1, default=str))
            checkpoint = tmp
        if report is not None:
            progress.send("stability_report", report=report)
        progress.send("epoch", metrics=metrics)
        # every rank reports every epoch (in a worker group, a barrier)
        report_epoch(metrics, checkpoint, config.in_process, spec, config.storage, config.forward)
