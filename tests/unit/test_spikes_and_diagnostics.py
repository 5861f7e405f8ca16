"""Spike detection, recoveries, snapshots and diagnostics on fake state (no cluster)."""

import math

import pytest
import torch
from torch import nn

from orchestrator.spec import SpikeSpec
from orchestrator.stability.diagnostics import Diagnostics, dead_fraction, loss_oscillation
from orchestrator.stability.snapshots import SnapshotRing
from orchestrator.stability.spikes import SpikeDetector, SpikeGuard, zscore
from orchestrator.train.hooks import StepState
from orchestrator.train.schedules import Schedule


def test_zscore():
    assert zscore(3.0, 1.0, 4.0) == 1.0
    assert zscore(1.0, 1.0, 0.0) == 0.0 and zscore(2.0, 1.0, 0.0) == math.inf


def test_detector_waits_for_warmup_then_flags_a_spike_and_does_not_learn_from_it():
    det = SpikeDetector(window=20, z_loss=6, z_grad=6, warmup=10)
    noise = [0.01 * ((i * 7) % 5 - 2) for i in range(40)]
    assert all(det.check(1.0 + n, 0.5 + n)[0] is None for n in noise)
    mean_before = det.loss.mean
    trigger, z = det.check(5.0, 0.5)
    assert trigger == "loss" and z > 6 and det.loss.mean == mean_before
    assert det.check(1.0, 50.0)[0] == "grad_norm"
    assert det.check(float("nan"), 0.5) == (None, 0.0)  # the non-finite guard's job


class FakeComps:
    """Enough of Components for snapshots: a model, an optimizer, a schedule."""

    def __init__(self):
        self.model = nn.Linear(2, 1)
        opt = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.schedule = Schedule(torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0), None)
        self.state = StepState(model=self.model, optimizer=opt, device=torch.device("cpu"), schedule=self.schedule)


def run_guard(guard, comps, losses, typical=None):
    """`losses`: each step's batch loss; `typical`: the same without each rank's worst sample (default: equal)."""
    st = comps.state
    for step, loss in enumerate(losses):
        st.step = step
        st.begin_step()
        st.global_loss = loss
        st.global_loss_typical = loss if typical is None else typical[step]
        st.grad_norm_value = 1.0
        if guard.on_batch(st, {}) is None:
            continue
        guard.before_step(st)
        if not st.skip:
            with torch.no_grad():
                comps.model.weight.add_(1.0)  # a visible "update"
        guard.after_step(st)
    return st


CALM = [1.0 + 0.01 * ((i * 7) % 5 - 2) for i in range(30)]


def test_skip_action_drops_the_spike_step():
    comps = FakeComps()
    guard = SpikeGuard(SpikeSpec(warmup_steps=10, action="skip"))
    st = run_guard(guard, comps, CALM + [50.0])
    assert st.skip and st.events[-1]["action"] == "skip" and guard.counts["spikes"] == 1


def test_a_batch_made_high_by_one_sample_is_not_a_spike_and_one_where_every_sample_rose_is():
    # a 4-sample batch with one mislabelled sample: loss 5.0, the other three calm (what the guard judges)
    comps = FakeComps()
    guard = SpikeGuard(SpikeSpec(warmup_steps=10, action="skip"))
    st = run_guard(guard, comps, CALM + [5.0], typical=CALM + [1.0])
    assert not st.skip and guard.counts["spikes"] == 0 and st.events == []
    st = run_guard(guard, comps, CALM + [5.0], typical=CALM + [5.0])
    assert st.skip and guard.counts["spikes"] == 1


def test_the_loss_without_the_worst_sample():
    from orchestrator.train.losses import without_worst

    total, count = without_worst(torch.tensor([0.1, 0.2, 9.0, 0.3]))
    assert count == 3 and total.item() == pytest.approx(0.6)
    assert without_worst(torch.tensor([7.0]))[1] == 0  # a batch of one: nothing is left to judge


def test_rollback_restores_a_snapshot_old_enough_and_skips_batches():
    comps = FakeComps()
    w0 = comps.model.weight.detach().clone()
    spec = SpikeSpec(warmup_steps=10, action="rollback", snapshot_every=5, rollback_skip_batches=3, cut_lr_after=0)
    guard = SpikeGuard(spec)
    run_guard(guard, comps, CALM + [50.0])  # a lone loss spike: that step is dropped, nothing rolled back
    assert guard.counts["rollbacks"] == 0 and comps.state.events[-1]["action"] == "skip"
    comps.model.weight.data.copy_(w0)
    comps.state.events.clear()
    # steps 0..29 each add 1.0 to the weight; step 30 spikes again within 5 steps of the last: confirmed
    guard.suspect_step = 27
    st = run_guard(guard, comps, CALM + [50.0])
    event = st.events[-1]
    assert event["action"] == "rollback" and event["rollback_to"] == 25 and event["skip_batches"] == 3
    # The snapshot at step 25 was taken before that step's update: 25 updates, not the 30 applied since.
    torch.testing.assert_close(comps.model.weight.detach(), w0 + 25.0)
    assert guard.skip_batches == 3
    dropped = [guard.on_batch(st, {}) for _ in range(4)]
    assert dropped[:3] == [None, None, None] and dropped[3] == {}
    assert guard.counts == {"spikes": 2, "rollbacks": 1, "lr_reductions": 0, "batches_skipped": 3, "rebaselines": 0, "grad_norm_jumps": 0}
    assert event["replica_drift"] == 0.0 and guard.current_lr_factor(31) == 1.0


def test_a_spike_that_returns_after_a_rollback_cuts_the_lr_for_good():
    comps = FakeComps()
    spec = SpikeSpec(warmup_steps=10, action="rollback", snapshot_every=5, rollback_skip_batches=0,
                     cut_lr_after=2, lr_factor=0.5)
    guard = SpikeGuard(spec)
    guard.suspect_step = 27  # confirmed spikes (see the test below): each one rolls back
    st = run_guard(guard, comps, CALM + [50.0])
    assert guard.current_lr_factor(st.step + 1) == 1.0  # one rollback cured it: the LR is left alone
    guard.suspect_step = 27
    st = run_guard(guard, comps, CALM + [50.0])  # it comes back within the window
    assert guard.current_lr_factor(st.step + 100) == 0.5 and st.events[-1]["lr_factor"] == 0.5
    assert guard.counts["rollbacks"] == 2 and guard.counts["lr_reductions"] == 1


def test_a_lone_loss_spike_is_only_skipped_a_confirmed_one_rolls_back():
    comps = FakeComps()
    guard = SpikeGuard(SpikeSpec(warmup_steps=10, action="rollback", snapshot_every=5, rollback_skip_batches=0))
    st = run_guard(guard, comps, CALM + [50.0] + CALM[:8] + [50.0])  # two lone spikes 9 steps apart
    assert [e["action"] for e in st.events] == ["skip", "skip"] and guard.counts["rollbacks"] == 0
    st = run_guard(guard, comps, CALM + [50.0, 1.0, 1.0, 50.0])  # the second within 5 steps: confirmed
    assert [e["action"] for e in st.events[-2:]] == ["skip", "rollback"] and guard.counts["rollbacks"] == 1
    comps.state.events.clear()
    st = comps.state
    st.begin_step()
    st.step, st.global_loss, st.global_loss_typical, st.grad_norm_value = 200, 1.0, 1.0, 50.0  # a gradient-norm spike needs no confirmation
    guard.before_step(st)
    assert st.events[-1]["trigger"] == "grad_norm_spike" and st.events[-1]["action"] == "rollback"


def test_under_a_clip_a_gradient_norm_spike_with_a_calm_loss_is_let_through_and_a_loss_spike_after_it_rolls_back():
    comps = FakeComps()
    guard = SpikeGuard(SpikeSpec(warmup_steps=10, action="rollback", snapshot_every=5, rollback_skip_batches=0), clipped=True)
    st = run_guard(guard, comps, CALM)
    st.begin_step()
    st.step, st.global_loss, st.global_loss_typical, st.grad_norm_value = 30, 1.0, 1.0, 50.0
    guard.before_step(st)
    assert not st.skip and st.events[-1]["action"] == "clipped" and guard.counts["rollbacks"] == 0
    assert guard.detector.grad.mean > 1.0  # followed: a norm that keeps rising is not flagged forever
    st.begin_step()
    st.step, st.global_loss, st.global_loss_typical, st.grad_norm_value = 32, 50.0, 50.0, 1.0  # the loss follows within 5 steps: trouble
    guard.before_step(st)
    assert st.skip and st.events[-1]["action"] == "rollback" and guard.counts["rollbacks"] == 1
    unclipped = SpikeGuard(SpikeSpec(warmup_steps=10, action="rollback", snapshot_every=5, rollback_skip_batches=0))
    st = run_guard(unclipped, FakeComps(), CALM)
    st.begin_step()
    st.step, st.global_loss, st.global_loss_typical, st.grad_norm_value = 30, 1.0, 1.0, 50.0  # nothing bounded this update: roll it back
    unclipped.before_step(st)
    assert st.skip and st.events[-1]["action"] == "rollback"


SHIFT = dict(warmup_steps=10, action="rollback", snapshot_every=5, rollback_skip_batches=3, cut_lr_after=1, lr_factor=0.5)


def test_a_sustained_new_loss_level_is_rebaselined_after_two_rollbacks_not_rolled_back_forever():
    """The data changed at step 30 (loss 1.0 -> 4.0 for good): restored weights meet the new level at once."""
    shifted = CALM + [4.0 + 0.04 * ((i * 3) % 5 - 2) for i in range(60)]
    comps = FakeComps()
    guard = SpikeGuard(SpikeSpec(**SHIFT))
    st = run_guard(guard, comps, shifted)
    actions = [e["action"] for e in st.events]
    assert actions == ["skip", "rollback", "rollback", "rebaseline"]  # a spike again 4 steps on: confirmed at once
    assert guard.counts["rollbacks"] == 2 and guard.counts["rebaselines"] == 1 and not st.stop_reason
    assert guard.current_lr_factor(st.step) == 1.0  # the streak's LR cuts are undone: they answered a shift
    assert st.events[-1]["trigger"] == "loss_level_shift" and not st.skip  # training goes on at the new level
    assert guard.detector.loss.mean == pytest.approx(4.0, abs=0.1)
    # Without the re-baseline the same stream rolls back again and again and starves the LR.
    comps = FakeComps()
    stuck = SpikeGuard(SpikeSpec(**{**SHIFT, "rebaseline_after": 0}))
    run_guard(stuck, comps, shifted)
    assert stuck.counts["rollbacks"] >= 5 and stuck.current_lr_factor(0) <= 0.5 ** 5


def test_a_spike_that_needs_updates_to_come_back_is_not_a_level_shift():
    """A too-high LR: the restored weights are calm at first and the spike returns a few updates later."""
    comps = FakeComps()
    guard = SpikeGuard(SpikeSpec(**SHIFT))
    episode = [40.0, 40.0] + [1.0] * 3 + [1.0, 1.0, 1.0]  # confirmed spike, 3 dropped batches, calm restart
    st = run_guard(guard, comps, CALM + episode * 4)
    assert guard.counts["rebaselines"] == 0 and guard.counts["rollbacks"] == 4
    assert guard.current_lr_factor(st.step) == 0.5 ** 4  # every cut stays


def test_reduce_lr_cuts_then_rewarms():
    comps = FakeComps()
    guard = SpikeGuard(SpikeSpec(warmup_steps=10, action="reduce_lr", lr_factor=0.5, rewarm_steps=4))
    run_guard(guard, comps, CALM + [50.0])
    spike_step = len(CALM)
    assert [guard.current_lr_factor(spike_step + i) for i in range(5)] == pytest.approx([0.125, 0.25, 0.375, 0.5, 0.5])


def test_retry_budget_declares_divergence():
    comps = FakeComps()
    guard = SpikeGuard(SpikeSpec(warmup_steps=10, action="skip", max_recoveries=2))
    st = run_guard(guard, comps, CALM + [50.0, 60.0, 70.0])
    assert st.stop_reason.diverged and str(st.stop_reason).startswith("diverged: 3 loss spikes exceeded stability.spike.max_recoveries=2")
    assert st.events[-1]["action"] == "stop"


def test_snapshot_ring_picks_newest_old_enough_and_drops_newer():
    comps = FakeComps()
    ring = SnapshotRing(size=3)
    for step in (10, 20, 30):
        with torch.no_grad():
            comps.model.weight.fill_(step)
        ring.add(step, comps.state)
    step, snap = ring.pick(before_step=35, min_age=10)
    assert step == 20 and snap["model"]["weight"].eq(20).all()
    assert [s for s, _ in ring.ring] == [10, 20]
    assert ring.pick(before_step=12, min_age=10)[0] == 10  # nothing old enough: the oldest


def test_dead_fraction_and_oscillation():
    out = torch.relu(torch.tensor([[[-1.0], [2.0], [-3.0], [0.5]], [[-1.0], [-2.0], [-3.0], [0.5]]]))
    assert dead_fraction(out) == 0.5  # channels 0 and 2 never fire
    assert loss_oscillation([3.0, 2.0, 1.0]) == pytest.approx(0.0)  # a steady decline is smooth
    assert loss_oscillation([1.0, 2.0, 1.0, 2.0]) == pytest.approx((8 / 9) ** 0.5 / 1.5)  # diffs +1,-1,+1: std 0.943; mean loss 1.5
    assert loss_oscillation([1.0, 2.0, 1.0, 2.0]) > loss_oscillation([1.0, 1.1, 1.0, 1.1])
    converged = [1e-4, 4e-4, 0.0, 3e-4, 1e-5]  # batch-to-batch jitter at a loss ~1e-4 (a run at 100% accuracy)
    assert loss_oscillation(converged) > 1 and loss_oscillation(converged, floor=0.011) < 0.05  # 1% of its first loss, 1.1
    assert loss_oscillation([1.0, 2.0, 1.0, 2.0], floor=0.011) == loss_oscillation([1.0, 2.0, 1.0, 2.0])  # above the floor: as before


def test_diagnostics_name_the_layer_where_trouble_started():
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))
    diag = Diagnostics(model, every=1)
    st = StepState(model=model, optimizer=None, device=torch.device("cpu"))
    for step in range(5):
        st.step, st.global_loss, st.global_loss_typical = step, 1.0, 1.0
        st.begin_step()
        diag.on_batch(st, {})
        model(torch.randn(3, 2))
        norms = [torch.tensor(1.0)] * 4
        if step == 4:
            norms[2] = torch.tensor(100.0)  # "2.weight" blows up
            st.events.append({"step": 4, "trigger": "grad_norm_spike", "action": "skip", "value": 9.0})
            st.skip = True
        st.param_grad_norms = norms
        diag.after_backward(st)
        diag.after_step(st)
    report = diag.report(st.events, {"spikes": 1})
    assert report["first_trouble"]["layer"] == "2.weight" and report["first_trouble"]["step"] == 4
    assert "Trouble started at step 4" in report["summary"] and "2.weight" in report["summary"]
    assert "1" in report["dead_units"]  # the ReLU was sampled


def test_a_converged_runs_oscillation_is_measured_against_its_first_loss_and_a_resume_keeps_it():
    model = nn.Sequential(nn.Linear(2, 2))
    diag = Diagnostics(model, every=1000)
    st = StepState(model=model, optimizer=None, device=torch.device("cpu"))
    for step, loss in enumerate([1.1, 0.6, 0.2] + [1e-4, 4e-4, 0.0, 3e-4] * 30):
        st.step = step
        st.begin_step()
        st.global_loss = loss  # the step's agreed loss, as the loop sets it
        diag.after_step(st)
    assert diag.report([], {})["loss_oscillation"] < 0.05  # jitter of ~3e-4 against 1% of 1.1, not against 1e-4
    resumed = Diagnostics(model, every=1000)
    resumed.load_state_dict(diag.state_dict())  # the window holds only the converged steps now
    assert resumed.report([], {})["loss_oscillation"] == diag.report([], {})["loss_oscillation"]
    fine_tune = Diagnostics(model, every=1000, chance_loss=math.log(4))  # it starts converged: its first loss is no scale
    for step, loss in enumerate([3e-4, 1e-4, 4e-4, 0.0] * 30):
        st.step = step
        st.begin_step()
        st.global_loss = loss
        fine_tune.after_step(st)
    assert fine_tune.report([], {})["loss_oscillation"] < 0.05  # against 1% of ln 4, the chance level of 4 classes


def test_retry_budget_is_a_rate_scattered_spikes_do_not_stop_a_run():
    comps = FakeComps()
    guard = SpikeGuard(SpikeSpec(warmup_steps=10, window=20, action="skip", max_recoveries=2))
    calm = [1.0 + 0.01 * ((i * 7) % 5 - 2) for i in range(25)]
    st = run_guard(guard, comps, CALM + ([50.0] + calm) * 4)  # 4 spikes, each more than a window apart
    assert guard.counts["spikes"] == 4 and st.stop_reason is None


def test_a_background_snapshot_is_the_state_when_taken_though_the_next_forward_and_update_run():
    from orchestrator.stability.snapshots import capture

    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(16, 4)).sum().backward()
    opt.step()  # Adam's moments exist
    schedule = Schedule(torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0), None)
    st = StepState(model=model, optimizer=opt, device=torch.device("cpu"), schedule=schedule)
    expected = capture(st)
    ring = SnapshotRing()
    ring.add(7, st, background=True)
    taken = ring.ring[-1][1]["model"]
    # the buffers the next forward writes were copied at once, not left to the thread
    assert taken["1.running_mean"].data_ptr() != model[1].running_mean.data_ptr()
    model(torch.randn(16, 4) + 5).sum().backward()  # the next step's forward (BN statistics move) and backward
    ring.wait()  # as before_step does, before the update
    opt.step()
    step, snap = ring.pick(before_step=100, min_age=1)
    assert step == 7
    assert all(torch.equal(snap["model"][k], v) for k, v in expected["model"].items())
    moments = lambda s: [t for p in s["optimizer"]["state"].values() for t in p.values()]
    assert all(torch.equal(a, b) for a, b in zip(moments(snap), moments(expected)))
    assert not torch.equal(snap["model"]["0.weight"], model[0].weight.detach())  # the update moved the live ones


def test_the_largest_update_ratio_is_a_weights_not_a_zero_bias_whose_ratio_means_nothing():
    model = nn.Linear(4, 4)
    nn.init.zeros_(model.bias)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    diag = Diagnostics(model, every=1)
    st = StepState(model=model, optimizer=optimizer, device=torch.device("cpu"))
    st.step, st.global_loss = 0, 1.0
    st.begin_step()
    diag.on_batch(st, {})
    model(torch.randn(8, 4)).square().mean().backward()
    st.param_grad_norms = [p.grad.norm() for p in model.parameters()]
    diag.after_backward(st)
    before = model.weight.detach().clone()
    optimizer.step()
    diag.after_step(st)
    worst = diag.report([], {})["largest_update_ratio"]
    expected = ((model.weight.detach() - before).norm() / before.norm()).item()
    assert worst["layer"] == "weight" and worst["update_ratio"] == pytest.approx(expected), worst


def test_a_sampled_step_records_each_relu_layers_dead_fraction_and_each_weights_update_ratio():
    """The per-layer values of a sampled step are read from the device together, after the update."""
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU())
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0], [-1.0, -1.0]]))
        model[0].bias.zero_()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    diag = Diagnostics(model, every=2)
    st = StepState(model=model, optimizer=optimizer, device=torch.device("cpu"))
    for step in (0, 1):  # step 0 is sampled, step 1 is not
        st.step, st.global_loss = step, 1.0
        st.begin_step()
        diag.on_batch(st, {})
        model(torch.tensor([[1.0, 2.0], [3.0, 1.0]])).sum().backward()  # positive inputs: units 2 and 3 never fire
        st.param_grad_norms = [p.grad.norm() for p in model.parameters()]
        diag.after_backward(st)
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.step()
        diag.after_step(st)
        optimizer.zero_grad()
        if step == 0:
            expected = [((p.detach() - b).norm() / b.norm()).item() for p, b in zip(model.parameters(), before)]
            recorded = {name: dict(values) for name, values in diag.layers.items()}
    assert recorded["1"]["dead_fraction"] == 0.5
    assert recorded["0.weight"]["update_ratio"] == pytest.approx(expected[0])
    assert recorded["2.weight"]["update_ratio"] == pytest.approx(expected[2])
    assert "update_ratio" not in recorded["0.bias"]  # a bias's ratio means nothing
    assert diag.layers == recorded  # the unsampled step changed nothing
