"""Resume is the exact continuation: a run stopped after epoch 0 and resumed from its checkpoint ends
epoch 1 with the state of a run that never stopped (the real train_step, every default guard on)."""

import torch

from orchestrator.spec import JobSpec
from orchestrator.stability.spikes import SpikeGuard
from orchestrator.train.checkpointing import load_checkpoint, save_checkpoint
from orchestrator.train.components import build_components, seed_everything
from orchestrator.train.loop import train_step

STEPS = 80  # per epoch: past the input-scale check's 50 warm-up steps and the spike detector's


def make(faults=()):
    spec = JobSpec.model_validate({
        "model": {"kind": "mlp", "hidden": [16], "dropout": 0.2},  # dropout: the epoch's RNG stream matters too
        "data": {"train": "t.parquet", "val": "v.parquet", "shape": [6], "num_classes": 3, "batch_size": 8},
        "optimizer": {"name": "adam", "lr": 0.01},
        "schedule": {"kind": "cosine", "warmup_epochs": 1},
        "run": {"name": "exact", "epochs": 2},
        "faults": list(faults)})
    return spec, build_components(spec, STEPS, torch.device("cpu"))


def batch(epoch: int, i: int) -> dict:
    g = torch.Generator().manual_seed(epoch * 1000 + i)
    x = torch.randn(8, 6, generator=g)
    return {"x": x, "y": (x[:, 0] > 0).long() + (x[:, 1] > 1).long()}


def run_epoch(comps, spec, epoch: int) -> None:
    seed_everything(spec.run.seed, epoch, 0)  # as the loop does at every epoch start
    comps.state.epoch = epoch
    for i in range(STEPS):
        train_step(comps, batch(epoch, i), spec)


# Guard attributes a checkpoint leaves out on purpose: references to the run, per-step scratch, and the
# rollback's in-memory snapshots (several copies of the model: a resume starts a new ring), the clipper's list of
# the model's parameters.
NOT_CHECKPOINTED = {"comps", "ring", "spec", "excluded", "path", "last_norms", "before", "sampling", "_listed"}


def live_state(obj):
    """Every guard's own attributes, read directly (not through its state_dict, which is what is tested)."""
    if isinstance(obj, (torch.Tensor, int, float, str, bool, type(None))):
        return obj
    if isinstance(obj, dict):
        return {k: live_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)) or type(obj).__name__ == "deque":
        return [live_state(v) for v in obj]
    return {k: live_state(v) for k, v in vars(obj).items() if k not in NOT_CHECKPOINTED}


def full_state(comps) -> dict:
    st = comps.state
    return {"model": st.model.state_dict(), "optimizer": st.optimizer.state_dict(), "schedule": comps.schedule.state_dict(),
            "guards": {type(g).__name__: live_state(g) for g in comps.safeguards.guards}, "step": st.step}


def assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert torch.allclose(a.float(), b.float(), rtol=0, atol=1e-6), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert a == b or abs(a - b) <= 1e-6 * max(1.0, abs(a)), f"{where}: {a} != {b}"  # a == b: inf (no best yet)
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_resume_after_an_epoch_continues_exactly(tmp_path):
    # An LR spike late in epoch 0 makes the spike guard roll back and skip 10 batches: some of them are
    # still pending when the epoch ends, so the checkpoint must carry them (and the input-scale estimate).
    faults = [{"kind": "lr_spike", "at_step": 74, "factor": 300.0}]
    spec, calm = make(faults)
    run_epoch(calm, spec, 0)
    pending = calm.safeguards.find(SpikeGuard).skip_batches
    assert calm.safeguards.find(SpikeGuard).counts["rollbacks"] >= 1 and pending > 0, "the scenario needs a pending skip"
    save_checkpoint(tmp_path, calm, epoch=0, spec_yaml=spec.to_yaml())
    run_epoch(calm, spec, 1)

    _, resumed = make(faults)
    load_checkpoint(tmp_path, resumed)
    run_epoch(resumed, spec, 1)
    assert_same(full_state(calm), full_state(resumed))
