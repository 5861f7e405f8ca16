"""A batch a guard rejected is remembered in the run directory the moment it is rejected, and dropped
again when the run resumes from a checkpoint older than it (a crash after the last checkpoint)."""

import json

import torch

from orchestrator.spec import JobSpec
from orchestrator.stability.bad_batches import BadBatches, rejected_now
from orchestrator.stability.nonfinite import NonFiniteGuard
from orchestrator.train.checkpointing import load_checkpoint, save_checkpoint
from orchestrator.train.components import build_components, seed_everything
from orchestrator.train.loop import train_step
from tests.unit.test_resume_exact import STEPS, batch


def make(run_dir):
    spec = JobSpec.model_validate({
        "model": {"kind": "mlp", "hidden": [16]},
        "data": {"train": "t.parquet", "val": "v.parquet", "shape": [6], "num_classes": 3, "batch_size": 8},
        "optimizer": {"name": "adam", "lr": 0.01}, "run": {"name": run_dir.name, "storage_path": str(run_dir.parent), "epochs": 2},
        # the data itself is bad at step 100 = epoch 1, batch 20, on every pass over it
        "faults": [{"kind": "nan_batch", "at_step": STEPS + 20}]})
    return spec, build_components(spec, STEPS, torch.device("cpu"))


def run_epoch(comps, spec, epoch):
    seed_everything(spec.run.seed, epoch, 0)
    comps.state.epoch = epoch
    for i in range(STEPS):
        train_step(comps, batch(epoch, i), spec)


def test_a_rejected_batch_is_dropped_again_after_a_crash_and_resume(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    spec, first = make(run_dir)
    run_epoch(first, spec, 0)
    save_checkpoint(tmp_path / "ckpt", first, epoch=0, spec_yaml=spec.to_yaml())
    run_epoch(first, spec, 1)  # meets the NaN batch, skips it... and crashes before the next checkpoint
    assert first.safeguards.find(NonFiniteGuard).total == 1
    assert json.loads((run_dir / "bad_batches.json").read_text()) == [
        {"epoch": 1, "index": 20, "step": STEPS + 20, "trigger": "nonfinite"}]

    _, again = make(run_dir)
    load_checkpoint(tmp_path / "ckpt", again)
    again.safeguards.find(BadBatches).recall()  # what the loop's resume does at start-up
    run_epoch(again, spec, 1)
    assert again.safeguards.find(NonFiniteGuard).total == 0  # never met again: dropped before the forward
    assert again.safeguards.find(BadBatches).dropped == 1
    assert all(torch.isfinite(p).all() for p in again.state.model.parameters())


def test_only_guard_rejections_are_remembered():
    events = [{"step": 5, "trigger": "fault", "action": "nan_batch"}, {"step": 5, "trigger": "nonfinite", "action": "skip"},
              {"step": 6, "trigger": "grad_spike", "action": "rollback"}, {"step": 7, "trigger": "fault", "action": "lr_spike"}]
    assert [rejected_now(events, s) for s in (4, 5, 6, 7)] == [[], ["nonfinite"], ["grad_spike"], []]
