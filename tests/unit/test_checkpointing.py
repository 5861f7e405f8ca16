"""Checkpoint round trips, including PBT's clone: another trial's weights under this trial's hyper-parameters."""

import torch

from orchestrator.spec import JobSpec
from orchestrator.train.checkpointing import load_checkpoint, save_checkpoint
from orchestrator.train.components import build_components
from orchestrator.train.resume import restore_agreed
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


def test_a_clone_with_a_mutated_batch_size_replays_its_own_one_cycle_schedule(tmp_path):
    # The donor took 10 steps per epoch; the clone's bigger batch takes 4. Replaying the donor's 20 steps
    # ran the clone's 16-step one_cycle past its end ("Tried to step 21 times").
    def spec_for(lr, steps):
        spec = JobSpec.model_validate({
            "model": {"kind": "mlp", "hidden": [8]},
            "data": {"train": "t.parquet", "val": "v.parquet", "shape": [4], "num_classes": 3, "batch_size": 4},
            "optimizer": {"name": "sgd", "lr": lr, "momentum": 0.9}, "schedule": {"kind": "one_cycle"},
            "run": {"name": "ckpt", "epochs": 4}})
        return spec, build_components(spec, steps, torch.device("cpu"))

    spec, donor = spec_for(0.1, 10)
    train(donor, 20)  # two epochs
    save_checkpoint(tmp_path / "checkpoint_000001", donor, epoch=1, spec_yaml=spec.to_yaml())
    clone_spec, clone = spec_for(0.05, 4)
    restored = restore_agreed([tmp_path / "checkpoint_000001"], clone, print, keep_hyperparameters=True,
                              steps_per_epoch=[4] * 4)
    assert restored.epoch == 1 and clone.state.step == 8
    expected = lr_curve(clone_spec.schedule, base_lr=0.05, steps_per_epoch=4, epochs=4)[8]
    assert abs(clone.state.optimizer.param_groups[0]["lr"] - expected) < 1e-12
    train(clone, 8)  # the clone's remaining two epochs run to the schedule's end without error


def test_a_clone_keeps_the_donors_plateau_progress_under_its_own_factor(tmp_path):
    def spec_for(factor):
        spec = JobSpec.model_validate({
            "model": {"kind": "mlp", "hidden": [8]},
            "data": {"train": "t.parquet", "val": "v.parquet", "shape": [4], "num_classes": 3, "batch_size": 4},
            "optimizer": {"name": "sgd", "lr": 0.1}, "run": {"name": "ckpt", "epochs": 6},
            "schedule": {"kind": "plateau", "warmup_epochs": 0, "plateau_factor": factor, "plateau_patience": 3}})
        return spec, build_components(spec, STEPS, torch.device("cpu"))

    spec, donor = spec_for(0.5)
    for val_loss in (1.0, 0.8, 0.9, 0.95):  # best 0.8, then two bad epochs
        donor.schedule.epoch_end(val_loss, warmup_done=True)
    save_checkpoint(tmp_path / "c", donor, epoch=3, spec_yaml=spec.to_yaml())
    _, clone = spec_for(0.2)
    restore_agreed([tmp_path / "c"], clone, print, keep_hyperparameters=True, steps_per_epoch=[STEPS] * 6)
    plateau = clone.schedule.plateau
    assert (plateau.best, plateau.num_bad_epochs, plateau.factor) == (0.8, 2, 0.2)


def test_the_manifest_catches_a_flipped_byte_in_any_piece_and_still_reads_old_manifests(tmp_path):
    import hashlib
    import json

    import pytest

    from orchestrator.train.checkpointing import CorruptCheckpoint, file_digest, verify_checkpoint

    spec, comps = comps_for(0.1)
    save_checkpoint(tmp_path, comps, epoch=0, spec_yaml=spec.to_yaml())
    verify_checkpoint(tmp_path)
    state, manifest_path = tmp_path / "state.pt", tmp_path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    good = state.read_bytes()
    manifest["state.pt"].update(file_digest(state, piece_bytes=100))  # many small pieces, hashed in threads
    assert len(manifest["state.pt"]["sha256_pieces"]) == -(-len(good) // 100)
    manifest_path.write_text(json.dumps(manifest))
    verify_checkpoint(tmp_path)
    for at in (0, 99, len(good) // 2, len(good) - 1):  # first piece (both ends), middle, last
        state.write_bytes(good[:at] + bytes([good[at] ^ 1]) + good[at + 1:])
        with pytest.raises(CorruptCheckpoint, match="checksum"):
            verify_checkpoint(tmp_path)
    state.write_bytes(good)
    manifest["state.pt"] = {"bytes": len(good), "sha256": hashlib.sha256(good).hexdigest()}  # written by older Keel
    manifest_path.write_text(json.dumps(manifest))
    verify_checkpoint(tmp_path)
    state.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(CorruptCheckpoint, match="checksum"):
        verify_checkpoint(tmp_path)


def test_resuming_a_checkpoint_of_another_model_stops_with_one_line_naming_the_difference(tmp_path):
    # A transformer run checkpointed before QK-layernorm became its default, resumed by the same job now: the
    # line names the setting that fits (torch's own error lists every key over pages).
    import pytest

    def transformer(**model):
        spec = JobSpec.model_validate({
            "model": {"kind": "transformer", "width": 16, "heads": 4, **model},
            "data": {"train": "t.parquet", "val": "v.parquet", "shape": [6, 5], "num_classes": 2, "batch_size": 4},
            "run": {"name": "ckpt", "epochs": 4}})
        return spec, build_components(spec, STEPS, torch.device("cpu"))

    spec, before = transformer(qk_norm=False)
    save_checkpoint(tmp_path / "checkpoint_000001", before, epoch=1, spec_yaml=spec.to_yaml())
    _, now = transformer()
    with pytest.raises(ValueError) as refused:
        restore_agreed([tmp_path / "checkpoint_000001"], now, print)
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and str(tmp_path / "checkpoint_000001") in message
    assert "has no blocks.0.attention.q_norm.weight (trained without QK-layernorm? set model.qk_norm: false)" in message
    _, same = transformer(qk_norm=False)  # the model it was written with resumes
    assert restore_agreed([tmp_path / "checkpoint_000001"], same, print).epoch == 1


def spec_and_comps(lr: float = 0.1, epochs: int = 2, **schedule):
    spec = JobSpec.model_validate({
        "model": {"kind": "mlp", "hidden": [8]},
        "data": {"train": "t.parquet", "val": "v.parquet", "shape": [4], "num_classes": 3, "batch_size": 4},
        "optimizer": {"name": "sgd", "lr": lr, "momentum": 0.9}, "schedule": {"kind": "cosine", **schedule},
        "run": {"name": "ckpt", "epochs": epochs}})
    return spec, build_components(spec, STEPS, torch.device("cpu"))


def test_a_rerun_with_more_epochs_and_a_lower_lr_continues_under_them(tmp_path):
    """Re-running a run resumes it; what the re-run changed is in force from there. Loaded as they were, the
    checkpoint's optimizer kept lr 0.1 and its 2-epoch cosine, which run past its end climbs back to the peak."""
    spec, before = spec_and_comps(lr=0.1, epochs=2)
    train(before, 2 * STEPS)
    save_checkpoint(tmp_path / "checkpoint_000001", before, epoch=1, spec_yaml=spec.to_yaml())
    again_spec, again = spec_and_comps(lr=0.01, epochs=4)
    restored = restore_agreed([tmp_path / "checkpoint_000001"], again, print, steps_per_epoch=[STEPS] * 4, spec=again_spec)
    # warmup_epochs auto is a quarter of a run shorter than 4 epochs: the re-run's resolves to 1, and the line
    # names it too (the resumed epoch 2 is past either warmup)
    assert restored.changed == ["optimizer.lr 0.1 → 0.01", "schedule.warmup_epochs 0.5 → 1", "run.epochs 2 → 4"]
    for a, b in zip(before.state.model.parameters(), again.state.model.parameters()):  # the run's weights and moments
        assert torch.equal(a, b)
        assert torch.equal(before.state.optimizer.state[a]["momentum_buffer"], again.state.optimizer.state[b]["momentum_buffer"])
    curve = lr_curve(again_spec.schedule, base_lr=0.01, steps_per_epoch=STEPS, epochs=4)
    assert again.state.step == 2 * STEPS and abs(again.state.optimizer.param_groups[0]["lr"] - curve[2 * STEPS]) < 1e-12
    train(again, 2 * STEPS)
    assert again.state.optimizer.param_groups[0]["lr"] < 1e-9  # the 4-epoch cosine's end


def test_a_rerun_that_changes_no_hyper_parameter_is_the_exact_continuation(tmp_path):
    spec, before = spec_and_comps(epochs=4, warmup_epochs=1)
    train(before, 2 * STEPS - 1)
    before.state.step += 1  # a skipped step (a NaN batch): counted, but the schedule did not move
    save_checkpoint(tmp_path / "checkpoint_000001", before, epoch=1, spec_yaml=spec.to_yaml())
    same_hyper_parameters = spec.model_copy(update={"run": spec.run.model_copy(update={"max_failures": 3})})  # not a hyper-parameter
    _, again = spec_and_comps(epochs=4, warmup_epochs=1)
    restored = restore_agreed([tmp_path / "checkpoint_000001"], again, print, steps_per_epoch=[STEPS] * 4, spec=same_hyper_parameters)
    assert restored.changed == []
    assert again.schedule.state_dict() == before.schedule.state_dict()  # loaded: a replay would count the skipped step
    assert again.state.optimizer.state_dict()["param_groups"] == before.state.optimizer.state_dict()["param_groups"]


def test_a_rerun_of_a_plateau_run_keeps_the_cuts_it_made(tmp_path):
    spec, before = spec_and_comps(epochs=3)
    spec = JobSpec.model_validate({**spec.model_dump(), "schedule": {"kind": "plateau", "plateau_patience": 0}})
    before = build_components(spec, STEPS, torch.device("cpu"))
    train(before, 2 * STEPS)
    for val_loss in (1.0, 2.0):  # the second epoch is worse: the LR is halved
        before.schedule.epoch_end(val_loss, warmup_done=True)
    assert before.state.optimizer.param_groups[0]["lr"] == 0.05
    save_checkpoint(tmp_path / "checkpoint_000001", before, epoch=1, spec_yaml=spec.to_yaml())
    longer = JobSpec.model_validate({**spec.model_dump(), "run": {**spec.run.model_dump(), "epochs": 5}})
    again = build_components(longer, STEPS, torch.device("cpu"))
    restored = restore_agreed([tmp_path / "checkpoint_000001"], again, print, steps_per_epoch=[STEPS] * 5, spec=longer)
    assert restored.changed == ["run.epochs 3 → 5"] and again.state.optimizer.param_groups[0]["lr"] == 0.05


def test_a_rerun_on_more_workers_replays_the_schedule_to_where_its_own_plan_stands(tmp_path):
    # More workers, fewer steps per epoch (3, not 5): the checkpoint's cosine counted 10 steps of a 20-step run;
    # this plan's run is 12 steps long, and 2 epochs of it are 6 steps
    spec, before = spec_and_comps(epochs=4)
    train(before, 2 * STEPS)
    save_checkpoint(tmp_path / "checkpoint_000001", before, epoch=1, spec_yaml=spec.to_yaml())
    half = build_components(spec, 3, torch.device("cpu"))
    restored = restore_agreed([tmp_path / "checkpoint_000001"], half, print, steps_per_epoch=[3] * 4, spec=spec)
    assert restored.changed == ["steps to the end of epoch 2 10 → 6"]
    curve = lr_curve(spec.schedule, base_lr=0.1, steps_per_epoch=3, epochs=4)
    assert half.state.step == 6 and abs(half.state.optimizer.param_groups[0]["lr"] - curve[6]) < 1e-12
