"""Near zero loss, z-scores blow up on jitter: a loss spike must be material, and a gradient-norm jump the
clip let through is no trouble. Built from converged tabular runs whose reports listed 2-8 "spikes"."""

import math

from torch import nn

from orchestrator.spec import SpikeSpec, parse_spec
from orchestrator.stability.diagnostics import Diagnostics
from orchestrator.stability.spikes import SpikeDetector, SpikeGuard, material
from tests.unit.test_spikes_and_diagnostics import CALM, FakeComps, run_guard

CONVERGED = [1e-5 * (1 + 0.1 * ((i * 7) % 5 - 2)) for i in range(60)]  # a converged run's loss, 4 classes
FOUR_CLASSES = math.log(4)


def test_material():
    assert material(0.2, 0.05, scale=2.0, min_rise=0.05) and not material(0.14, 0.05, scale=2.0, min_rise=0.05)


def test_a_converged_runs_jitter_is_no_loss_spike_and_a_material_rise_still_is():
    guard = SpikeGuard(SpikeSpec(warmup_steps=10), chance_loss=FOUR_CLASSES)
    st = run_guard(guard, FakeComps(), CONVERGED + [1e-3])  # 100x its level (z in the thousands), 0.07% of chance
    assert not st.skip and guard.counts["spikes"] == 0 and st.events == []
    st = run_guard(guard, FakeComps(), CONVERGED + [0.5])  # back to a third of chance: trouble
    assert st.skip and guard.counts["spikes"] == 1
    z_only = SpikeGuard(SpikeSpec(warmup_steps=10, min_rise=0), chance_loss=FOUR_CLASSES)
    st = run_guard(z_only, FakeComps(), CONVERGED + [1e-3])  # the z-score alone: what the floor prevents
    assert st.skip and z_only.counts["spikes"] == 1


def test_a_loss_without_a_chance_level_is_measured_against_its_first_value_and_a_resume_keeps_it():
    det = SpikeDetector(window=20, warmup=10, min_rise=0.05)
    for loss in [2.0] + [0.01 * (1 + 0.1 * ((i * 7) % 5 - 2)) for i in range(200)]:
        assert det.check(loss, 1.0)[0] is None
    saved = det.state_dict()
    resumed = SpikeDetector(window=20, warmup=10, min_rise=0.05)
    resumed.load_state_dict(saved)
    assert resumed.check(0.09, 1.0)[0] is None  # rose 0.08: under 5% of the first loss, 2.0, not of the resumed step's
    z_only = SpikeDetector(window=20, warmup=10, min_rise=0)
    z_only.load_state_dict(saved)
    assert z_only.check(0.09, 1.0)[0] == "loss"  # the same step by its z-score alone
    assert resumed.check(0.5, 1.0)[0] == "loss"


def test_the_job_s_spike_guard_measures_a_cross_entropy_loss_against_its_chance_level():
    from orchestrator.train.components import build_safeguards

    tree = {"model": {"kind": "mlp"}, "data": {"train": "t.parquet", "val": "v.parquet", "shape": [4], "num_classes": 4},
            "run": {"name": "r"}}
    guard = build_safeguards(parse_spec(tree), nn.Linear(4, 4)).find(SpikeGuard)
    assert guard.detector.chance_loss == FOUR_CLASSES and guard.detector.min_rise == 0.05


def test_a_gradient_norm_jump_under_the_clip_is_counted_apart_and_is_not_where_trouble_started():
    comps = FakeComps()
    guard = SpikeGuard(SpikeSpec(warmup_steps=10), clipped=True)
    st = run_guard(guard, comps, CALM)
    st.begin_step()
    st.step, st.global_loss, st.global_loss_typical, st.grad_norm_value = 30, 1.0, 1.0, 50.0
    guard.before_step(st)
    assert not st.skip and st.events[-1]["action"] == "clipped"
    assert guard.counts["spikes"] == 0 and guard.counts["grad_norm_jumps"] == 1
    diag = Diagnostics(nn.Linear(2, 2), every=1000)
    diag.after_step(st)
    report = diag.report(st.events, dict(guard.counts))
    assert report["first_trouble"] is None
    assert report["summary"].startswith("No guard fired") and "let through under the clip: 1" in report["summary"]
    assert "Fired" not in report["summary"]


def test_a_spike_s_event_and_the_report_give_the_loss_beside_its_usual_level():
    guard = SpikeGuard(SpikeSpec(warmup_steps=10, action="skip"))
    st = run_guard(guard, FakeComps(), CALM + [50.0])
    event = st.events[-1]
    assert event["observed"] == 50.0 and abs(event["usual"] - 1.0) < 0.01 and event["action"] == "skip"
    diag = Diagnostics(nn.Linear(2, 2), every=1000)
    diag.after_step(st)
    summary = diag.report(st.events, dict(guard.counts))["summary"]
    assert "Trouble started at step 30 (epoch 1): loss_spike (50 where 0.997 is usual); action: skip." in summary


def test_a_run_that_starts_far_above_chance_keeps_the_chance_level_as_its_scale():
    # every weight x10: the first loss is 67 against ln 10 = 2.3; a floor of 5% of 67 would hide a jump to 2.0
    start = [67.0, 40.0, 20.0, 8.0] + [0.02 * (1 + 0.1 * ((i * 7) % 5 - 2)) for i in range(200)]
    guard = SpikeGuard(SpikeSpec(warmup_steps=10, action="skip"), chance_loss=math.log(10))
    st = run_guard(guard, FakeComps(), start + [2.0])
    assert st.skip and guard.counts["spikes"] == 1
