"""Safeguards on fake state: the non-finite guard, early stopping, fault injection, the hook runner."""

import pytest
import torch

from orchestrator.spec import FaultSpec
from orchestrator.stability.early_stopping import EarlyStopping, early_stop_decision
from orchestrator.stability.faults import FaultInjector
from orchestrator.stability.nonfinite import NonFiniteGuard, should_skip
from orchestrator.train.hooks import Safeguards, StepState


def fake_state(step=0, nonfinite=0.0, rank=0):
    model = torch.nn.BatchNorm1d(2)
    st = StepState(model=model, optimizer=None, device=torch.device("cpu"), rank=rank, step=step)
    st.global_nonfinite = nonfinite
    return st


def test_should_skip():
    assert not should_skip(0.0)
    assert should_skip(1.0) and should_skip(float("nan"))


def test_guard_skips_counts_and_resets_on_a_good_step():
    guard = NonFiniteGuard(max_consecutive_skips=3)
    for step, bad in enumerate([0, 1, 1, 0, 1]):
        st = fake_state(step, bad)
        guard.on_batch(st, {})
        guard.before_step(st)
        assert st.skip == bool(bad) and st.stop_reason is None
    assert guard.total == 3 and guard.consecutive == 1


def test_guard_declares_divergence_after_budget():
    guard = NonFiniteGuard(max_consecutive_skips=2)
    for step in range(2):
        st = fake_state(step, 1.0)
        guard.on_batch(st, {})
        guard.before_step(st)
    assert st.stop_reason.diverged and str(st.stop_reason).startswith("diverged: 2 consecutive non-finite steps")
    assert "at step 1" in st.stop_reason.message


def test_guard_restores_bn_buffers_poisoned_by_a_skipped_forward():
    guards, st = Safeguards([NonFiniteGuard()]), fake_state(0, 1.0)  # the loop's own hook runner
    guards.on_batch(st, {})
    st.model(torch.full((4, 2), float("nan")))  # the forward writes NaN into running stats
    guards.decide(st)
    assert torch.isfinite(st.model.running_mean).all() and torch.isfinite(st.model.running_var).all()


class ReplacesItsBuffer(torch.nn.Module):
    """A user's layer that keeps an EMA of its inputs by assigning a new tensor to its buffer every forward."""

    def __init__(self):
        super().__init__()
        self.register_buffer("ema", torch.zeros(2))

    def forward(self, x):
        self.ema = 0.9 * self.ema + 0.1 * x.mean(0)
        return x * 1.0


def test_a_skipped_step_restores_a_buffer_the_model_replaced_rather_than_updated_in_place():
    guards = Safeguards([NonFiniteGuard()])
    st = StepState(model=ReplacesItsBuffer(), optimizer=None, device=torch.device("cpu"))
    for _ in range(3):  # healthy steps: every forward replaces the buffer's tensor
        st.global_nonfinite = 0.0
        guards.on_batch(st, {})
        st.model(torch.ones(4, 2))
        guards.decide(st)
    before = st.model.ema.clone()
    st.global_nonfinite = 1.0  # then a NaN batch, skipped
    guards.on_batch(st, {})
    st.model(torch.full((4, 2), float("nan")))
    guards.decide(st)
    assert torch.equal(st.model.ema, before)


def test_safeguards_used_with_a_second_model_snapshot_and_restore_that_models_buffers():
    guards = Safeguards([NonFiniteGuard()])
    for model in (ReplacesItsBuffer(), ReplacesItsBuffer()):  # the buffer list is per model, not the first one's
        st = StepState(model=model, optimizer=None, device=torch.device("cpu"))
        st.global_nonfinite = 0.0
        guards.on_batch(st, {})
        model(torch.ones(4, 2))
        guards.decide(st)
        before = model.ema.clone()
        st.global_nonfinite = 1.0
        guards.on_batch(st, {})
        model(torch.full((4, 2), float("nan")))
        guards.decide(st)
        assert torch.equal(model.ema, before)


def test_guard_state_round_trips():
    a, b = NonFiniteGuard(), NonFiniteGuard()
    a.consecutive, a.total = 2, 7
    b.load_state_dict(a.state_dict())
    assert (b.consecutive, b.total) == (2, 7)


@pytest.mark.parametrize("values, mode, expected_stop_at", [
    ([1.0, 0.9, 0.95, 0.96, 0.97], "min", 4),   # patience 3 after the best at index 1
    ([0.5, 0.6, 0.7, 0.8, 0.9], "max", None),   # always improving
    ([1.0, 0.9, float("nan")], "min", 2),      # non-finite: immediate
    ([1.0, 50.0], "min", 1),                    # beyond divergence threshold
])
def test_early_stop_decision(values, mode, expected_stop_at):
    best, bad, stop_at = None, 0, None
    for i, v in enumerate(values):
        best, bad, reason = early_stop_decision(v, best, bad, mode=mode, patience=3, divergence_threshold=10.0 if mode == "min" else None)
        if reason:
            stop_at = i
            break
    assert stop_at == expected_stop_at


def test_min_delta_counts_tiny_gains_as_no_improvement():
    best, bad, _ = early_stop_decision(1.0, None, 0, mode="min", patience=2, min_delta=0.1)
    best, bad, _ = early_stop_decision(0.95, best, bad, mode="min", patience=2, min_delta=0.1)
    assert (best, bad) == (1.0, 1)


def test_early_stopping_object_sets_stop_reason_single_process():
    es, st = EarlyStopping("val_loss", "min", patience=1), fake_state()
    es.on_epoch_end(st, {"val_loss": 1.0})
    assert st.stop_reason is None
    es.on_epoch_end(st, {"val_loss": 1.5})
    assert st.stop_reason.kind == "early_stop" and str(st.stop_reason).startswith("early stop: no improvement")


def test_fault_injector_poisons_only_its_rank_and_steps():
    inj = FaultInjector([FaultSpec(kind="nan_batch", at_step=2, repeat=2, rank=1)], "image")
    batch = {"image": torch.ones(2, 3)}
    hits = [(step, rank) for step in range(5) for rank in (0, 1)
            if torch.isnan(inj.on_batch(fake_state(step, rank=rank), batch)["image"]).all()]
    assert hits == [(2, 1), (3, 1)]
    assert torch.isfinite(batch["image"]).all()  # the original batch is untouched


def test_an_input_inversion_shifts_every_ranks_batches_and_validation_from_its_step_on():
    inj = FaultInjector([FaultSpec(kind="invert_inputs", at_step=3, repeat=1000)], "image")
    batch = {"image": torch.ones(2, 3)}
    inverted = [(step, rank) for step in range(6) for rank in (0, 1)
                if (inj.on_batch(fake_state(step, rank=rank), batch)["image"] == -1).all()]
    assert inverted == [(s, r) for s in (3, 4, 5) for r in (0, 1)]
    assert (inj.eval_inputs(fake_state(2), torch.ones(2)) == 1).all() and (inj.eval_inputs(fake_state(3), torch.ones(2)) == -1).all()
    assert (batch["image"] == 1).all()


def test_safeguards_call_hooks_in_order_and_collect_state():
    calls = []

    class A:
        def before_step(self, st): calls.append("A")
        def state_dict(self): return {"a": 1}
        def load_state_dict(self, sd): calls.append(("loaded", sd))

    class B:
        def before_step(self, st): calls.append("B")

    guards = Safeguards([A(), B()])
    guards.call("before_step", None)
    guards.call("after_step", None)  # no one implements it: a no-op
    assert calls == ["A", "B"] and guards.state_dict() == {"A": {"a": 1}}
    guards.load_state_dict({"A": {"a": 2}})
    assert calls[-1] == ("loaded", {"a": 2})


def test_a_misspelt_hook_is_refused_when_the_safeguard_is_installed_or_called(tmp_path):
    class Typo:
        def before_stpe(self, st): pass

    with pytest.raises(ValueError, match="Typo.before_stpe is not a hook"):
        Safeguards([Typo()])
    with pytest.raises(ValueError, match="after_loss is not a hook"):
        Safeguards([]).call("after_loss", None)
    # Keel's own safeguards, every one installed, pass
    from orchestrator.spec import parse_spec
    from orchestrator.train.components import build_safeguards
    spec = parse_spec({"model": {"kind": "mlp", "hidden": [8]}, "data": {"train": "t.parquet", "val": "v.parquet",
                       "shape": [4], "num_classes": 2}, "run": {"name": "hooks", "storage_path": str(tmp_path)},
                       "stability": {"diagnostics": {"enabled": True}, "spike": {"enabled": True}, "early_stopping": {"enabled": True},
                                     "remember_bad_batches": True}})
    assert len(build_safeguards(spec, torch.nn.Linear(4, 2)).guards) == 9  # with the collapse recovery (on by default)


def test_a_spike_skip_also_restores_bn_buffers_the_huge_batch_wrote():
    # A 1e4x batch: BN normalizes it in training, so the update is tame, but its forward writes a running
    # variance ~1e8 times too large: evaluation would be ruined for hundreds of steps (measured in the
    # stress suite before this was fixed). A skipped step must leave no trace in the running stats.
    from orchestrator.spec import SpikeSpec
    from orchestrator.stability.spikes import SpikeGuard

    st = fake_state(0, 0.0)
    # the spike guard alone: putting the statistics back is the hook runner's job, whoever skipped
    guards = Safeguards([SpikeGuard(SpikeSpec(warmup_steps=5, action="skip"))])
    for step in range(20):
        st.step = step
        st.begin_step()
        guards.on_batch(st, {})
        huge = step == 19
        st.model(torch.randn(8, 2) * (1e4 if huge else 1.0))
        st.global_loss, st.global_loss_typical, st.grad_norm_value = 1.0, 1.0, (1e4 if huge else 1.0 + 0.01 * (step % 3))
        guards.decide(st)
        if huge:
            assert st.skip
    assert st.model.running_var.max() < 10


def test_an_out_of_scale_input_batch_is_skipped_and_leaves_no_trace_in_bn():
    # BN normalises a 1e4x batch away in training (loss and gradients look normal), but its forward would
    # multiply the running variance ~1e7-fold. The guard judges the input's mean square against its average.
    from orchestrator.data.preprocess import FEATURES

    st = fake_state(0, 0.0)
    guards = Safeguards([NonFiniteGuard(max_consecutive_skips=10, max_batch_scale_ratio=1000.0)])
    flagged = []
    for step in range(80):
        st.step = step
        st.begin_step()
        x = torch.randn(16, 2) * (1e4 if step == 70 else 1.0)
        if step == 30:
            x = torch.full((16, 2), float("nan"))  # an earlier NaN batch must not blind the scale check
        guards.on_batch(st, {FEATURES: x})
        st.model(x)
        st.global_outlier = st.batch_outlier.item() if st.batch_outlier is not None else 0.0  # agree_step's job
        st.global_nonfinite = float(not torch.isfinite(x).all())
        guards.decide(st)
        if st.skip:
            flagged.append(step)
    assert flagged == [30, 70] and st.events[-1]["trigger"] == "batch_outlier"
    assert st.model.running_var.max() < 10  # restored
