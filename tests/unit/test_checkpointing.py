"""Checkpoint round trips, including PBT's clone: another trial's weights under this trial's hyper-parameters."""

import torch

from orchestrator.spec import JobSpec
from orchestrator.train.checkpointing import load_checkpoint, save_checkpoint
from orchestrator.train.components import build_components
from orchestrator.train.schedules import lr_curve

STEPS = 5


def comps_for(lr: float):
    spec = JobSpec.model_validate({
        "model": {"kind": "mlp", "hidden": [8]},
        "data": {"train": "t.parquet", "val": "v.parquet", "shape": [4], "num_classes": 3, "batch_size": 4},
        "optimizer": {"name": "sgd", "lr": lr, "momentum": 0.9},
        "schedule": {"kind": "cosine", "warmup_epochs": 1},
        "run": {"name": "ckpt", "epochs": 4}})
    return spec, build_components(spec, STEPS, torch.device("cpu"))


def train(comps, steps: int) -> None:
    st = comps.state
    for i in range(steps):
        x = torch.randn(4, 4, generator=torch.Generator().manual_seed(i))
        torch.nn.functional.cross_entropy(st.model(x), torch.tensor([0, 1, 2, 0])).backward()
        st.optimizer.step()
        st.optimizer.zero_grad()
        comps.schedule.step()
        st.step += 1


def test_plain_resume_restores_everything_including_the_lr(tmp_path):
    spec, donor = comps_for(0.1)
    train(donor, 7)
    save_checkpoint(tmp_path, donor, epoch=1, spec_yaml=spec.to_yaml())
    _, fresh = comps_for(0.1)
    load_checkpoint(tmp_path, fresh)
    assert fresh.state.optimizer.param_groups[0]["lr"] == donor.state.optimizer.param_groups[0]["lr"]
    assert fresh.state.step == 7


def test_keep_hyperparameters_takes_weights_and_moments_but_keeps_this_trials_lr(tmp_path):
    spec, donor = comps_for(0.1)
    train(donor, 7)
    save_checkpoint(tmp_path, donor, epoch=1, spec_yaml=spec.to_yaml())
    clone_spec, clone = comps_for(0.01)
    load_checkpoint(tmp_path, clone, keep_hyperparameters=True)
    for a, b in zip(donor.state.model.parameters(), clone.state.model.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(donor.state.optimizer.state[a]["momentum_buffer"], clone.state.optimizer.state[b]["momentum_buffer"])
    # the LR is this spec's schedule replayed to the checkpoint's step, not the donor's
    expected = lr_curve(clone_spec.schedule, base_lr=0.01, steps_per_epoch=STEPS, epochs=4)[7]
    assert abs(clone.state.optimizer.param_groups[0]["lr"] - expected) < 1e-12
    assert abs(donor.state.optimizer.param_groups[0]["lr"] - 10 * expected) < 1e-12
