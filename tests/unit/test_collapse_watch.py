"""The stability report's collapse watch: a loss that climbs back to chance level with no spike is reported."""

import math
import random

import torch
from torch import nn

from orchestrator.spec import parse_spec
from orchestrator.stability.collapse import CollapseWatch, collapsed
from orchestrator.stability.diagnostics import Diagnostics
from orchestrator.train.components import chance_loss
from orchestrator.train.hooks import StepState

LN2 = math.log(2)
# The stress suite's long_lstm, Keel's defaults, seed 1 (2026-11-24): its logged training losses (every other
# step, 4 epochs of 25 steps) and its validation loss after each epoch (accuracy 0.75, 0.57, 0.55, 0.55).
LONG_LSTM_SEED1_TRAIN = [0.698, 0.699, 0.678, 0.748, 0.675, 0.676, 0.694, 0.69, 0.689, 0.672, 0.667, 0.661, 0.598, 0.475,
                         0.579, 0.742, 0.712, 0.707, 0.678, 0.692, 0.669, 0.684, 0.684, 0.675, 0.676, 0.705, 0.707, 0.667,
                         0.654, 0.675, 0.677, 0.669, 0.665, 0.685, 0.672, 0.712, 0.677, 0.688, 0.684, 0.69, 0.663, 0.694,
                         0.681, 0.702, 0.683, 0.675, 0.678, 0.67, 0.688, 0.725, 0.643, 0.651]
LONG_LSTM_SEED1_VAL = [0.5587, 0.6814, 0.7043, 0.6964]


def learn_then_forget(forget_at: int = 30, steps: int = 120, recover_at: int | None = None) -> list[float]:
    """long_lstm seed 1's shape: from ln 2 down to ~0.45, back to ln 2 from `forget_at`, optionally down again."""
    losses = []
    for step in range(steps):
        if recover_at is not None and step >= recover_at:
            loss = max(0.1, LN2 - 0.02 * (step - recover_at))
        elif step < forget_at:
            loss = LN2 - (LN2 - 0.45) * step / forget_at
        else:
            loss = min(LN2, 0.45 + 0.05 * (step - forget_at))
        losses.append(loss)
    return losses


def watch(losses: list[float], chance: float = LN2) -> CollapseWatch:
    w = CollapseWatch(chance)
    for step, loss in enumerate(losses):
        w.observe(step, step // 50, loss)
    return w


def test_the_rule_needs_a_model_that_had_learned_and_gave_nearly_all_of_it_back():
    assert collapsed(0.69, best=0.48, chance=LN2)
    assert collapsed(0.90, best=0.48, chance=LN2)        # worse than a uniform guess counts too
    assert not collapsed(0.60, best=0.48, chance=LN2)    # gave back only half of the progress
    assert not collapsed(0.69, best=0.62, chance=LN2)    # never got 15% of the way from chance to 0


def test_a_loss_that_returns_to_chance_and_stays_is_reported_with_where_it_was_best():
    found = watch(learn_then_forget()).finding()
    assert found is not None and found["lasted"]
    assert 30 < found["step"] < 60 and found["best_step"] < 40 and found["best_loss"] < 0.59
    assert found["chance_loss"] == round(LN2, 4)


def test_a_collapse_the_run_recovers_from_is_reported_as_recovered():
    found = watch(learn_then_forget(recover_at=70, steps=200)).finding()
    assert found is not None and not found["lasted"] and found["final_loss"] < 0.2


def test_a_healthy_noisy_loss_is_not_a_collapse():
    rng = random.Random(0)
    noisy = [max(0.05, LN2 * math.exp(-step / 80) + rng.uniform(-0.15, 0.15)) for step in range(400)]
    assert watch(noisy).finding() is None
    assert watch([LN2 + rng.uniform(-0.05, 0.05) for _ in range(200)]).finding() is None  # never learned: nothing lost


def test_the_report_says_it_in_its_summary_and_a_resumed_run_still_knows():
    model = nn.Sequential(nn.Linear(2, 2))
    st = StepState(model=model, optimizer=None, device=torch.device("cpu"))
    diag = Diagnostics(model, every=1000, chance_loss=LN2)
    losses = learn_then_forget()
    for step, loss in enumerate(losses[:60]):
        st.step, st.global_loss = step, loss
        diag.after_step(st)
    resumed = Diagnostics(model, every=1000, chance_loss=LN2)  # as after a restart from a checkpoint
    resumed.load_state_dict(diag.state_dict())
    for step, loss in enumerate(losses[60:], start=60):
        st.step, st.global_loss = step, loss
        resumed.after_step(st)
    report = resumed.report([], {})
    assert report["collapse"]["lasted"] and report["collapse"]["step"] < 60
    assert "went back to chance level or above (0.6" in report["summary"] and "stayed there" in report["summary"]
    assert Diagnostics(model, chance_loss=LN2).report([], {})["collapse"] is None


def test_chance_level_is_ln_classes_under_cross_entropy_and_unknown_for_other_losses():
    tree = {"model": {"kind": "mlp"}, "data": {"train": "t.parquet", "val": "v.parquet", "shape": [4], "num_classes": 10}, "run": {"name": "r"}}
    assert chance_loss(parse_spec(tree)) == math.log(10)
    assert chance_loss(parse_spec({**tree, "loss": {"label_smoothing": 0.1}})) == math.log(10)
    assert chance_loss(parse_spec({**tree, "loss": {"kind": "symmetric_ce"}})) is None


def test_the_long_lstm_collapse_is_caught_by_its_validation_loss_though_its_training_dip_is_too_short_to_show():
    model = nn.Sequential(nn.Linear(2, 2))
    st = StepState(model=model, optimizer=None, device=torch.device("cpu"))
    diag = Diagnostics(model, every=1000, chance_loss=LN2)
    for i, loss in enumerate(LONG_LSTM_SEED1_TRAIN):  # 13 logged losses per epoch
        st.step, st.epoch, st.global_loss = i, i // 13, loss
        diag.after_step(st)
        if i % 13 == 12:
            diag.on_epoch_end(st, {"val_loss": LONG_LSTM_SEED1_VAL[st.epoch]})
    assert diag.collapse[0].finding() is None  # a 3-step dip: the training loss's EMA never got near 0.59
    found = diag.report([], {})["collapse"]
    assert found["signal"] == "validation loss" and found["epoch"] == 1 and found["best_loss"] == 0.5587 and found["lasted"]
    assert "The validation loss went back to chance level or above (0.68; a uniform guess scores 0.69) after epoch 2" in diag.report([], {})["summary"]


def recovery_run(val_losses: list[float], max_rollbacks: int = 2, chance: float = LN2):
    """One weight per epoch: epoch e ends with the weight at e; the recovery sees each epoch's validation loss."""
    from orchestrator.spec import CollapseSpec
    from orchestrator.stability.collapse import CollapseRecovery

    model = nn.Linear(1, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    st = StepState(model=model, optimizer=optimizer, device=torch.device("cpu"))
    guard = CollapseRecovery(chance, CollapseSpec(action="rollback", max_rollbacks=max_rollbacks))
    weights = []
    for epoch, val in enumerate(val_losses):
        with torch.no_grad():
            model.weight.fill_(float(epoch))
        optimizer.param_groups[0]["lr"] = 0.1 / (epoch + 1)  # the schedule's LR at this epoch's end
        st.epoch, st.step = epoch, 25 * (epoch + 1)
        guard.on_epoch_end(st, {"val_loss": val})
        weights.append(model.weight.item())
    return guard, st, weights, optimizer


def test_a_collapsed_validation_loss_brings_back_the_best_epochs_weights_and_cuts_the_lr_for_good():
    guard, st, weights, optimizer = recovery_run(LONG_LSTM_SEED1_VAL)
    # epochs 2 and 3 (0.68, 0.70 against the best 0.56) each put epoch 1's weights back; epoch 4 is past the budget
    assert weights == [0.0, 0.0, 0.0, 3.0]
    _, _, _, right_after = recovery_run(LONG_LSTM_SEED1_VAL[:2])  # ends with the rollback
    assert right_after.param_groups[0]["lr"] == 0.1 / 2  # the schedule's LR now, not the best epoch's 0.1
    st.begin_step()
    guard.before_step(st)
    assert st.lr_scale == 0.25 and guard.rollbacks == 2  # halved at each rollback, for good
    assert [e["rollback_to_epoch"] for e in st.events if e["trigger"] == "collapse"] == [0, 0]
    metrics: dict = {}
    guard.on_report(metrics)
    assert metrics == {"collapse_rollbacks": 2}


def test_no_rollback_for_a_loss_that_rose_a_little_and_none_beyond_the_budget():
    _, _, weights, _ = recovery_run([0.56, 0.60, 0.62])
    assert weights == [0.0, 1.0, 2.0]
    guard, _, weights, _ = recovery_run([0.56, 0.69, 0.69, 0.69], max_rollbacks=1)
    assert guard.rollbacks == 1 and weights == [0.0, 0.0, 2.0, 3.0]


def test_a_rollback_needs_cross_entropy():
    import pytest
    from orchestrator.errors import BadInput

    tree = {"model": {"kind": "mlp"}, "data": {"train": "t.parquet", "val": "v.parquet", "shape": [4], "num_classes": 2},
            "run": {"name": "r"}, "loss": {"kind": "symmetric_ce"}, "stability": {"collapse": {"action": "rollback"}}}
    with pytest.raises(BadInput, match="stability.collapse.action: rollback needs loss.kind cross_entropy"):
        parse_spec(tree)


def test_a_confidently_wrong_model_is_reported_but_not_rolled_back():
    from orchestrator.stability.collapse import back_to_a_uniform_guess

    assert back_to_a_uniform_guess(0.7043, best=0.5587, chance=LN2)              # long_lstm seed 1, epoch 3
    assert not back_to_a_uniform_guess(5.123, best=0.5648, chance=math.log(10))  # data_shift: inputs inverted
    assert collapsed(5.123, best=0.5648, chance=math.log(10))                    # ... which the report still names
    _, _, weights, _ = recovery_run([0.56, 5.1, 0.3])
    assert weights == [0.0, 1.0, 2.0]


def test_by_default_a_loss_without_a_chance_level_gets_no_recovery_and_no_error():
    from orchestrator.stability.collapse import CollapseRecovery
    from orchestrator.train.components import build_safeguards

    tree = {"model": {"kind": "mlp"}, "data": {"train": "t.parquet", "val": "v.parquet", "shape": [4], "num_classes": 2},
            "run": {"name": "r"}}
    model = nn.Linear(4, 2)
    assert build_safeguards(parse_spec(tree), model).find(CollapseRecovery) is not None  # on by default
    assert build_safeguards(parse_spec({**tree, "loss": {"kind": "huber"}}), model).find(CollapseRecovery) is None


def test_a_loss_coming_down_through_chance_on_new_data_is_not_rolled_back():
    # data_shift seed 1 (inputs inverted from epoch 3): its validation loss per epoch, chance ln 10 = 2.30
    data_shift_seed1 = [1.485, 0.256, 6.201, 4.684, 2.451, 0.452, 0.132, 0.084]
    guard, _, weights, _ = recovery_run(data_shift_seed1, chance=math.log(10))
    assert guard.rollbacks == 0 and weights == [float(e) for e in range(8)]


def test_a_collapse_rollback_is_counted_in_the_reports_fired_line():
    from orchestrator import metric_keys as mk
    from orchestrator.stability.diagnostics import summarize

    guard, _, _, _ = recovery_run(LONG_LSTM_SEED1_VAL[:2])
    metrics: dict = {}
    guard.on_report(metrics)
    counters = {k: metrics[k] for k in mk.COUNTERS if k in metrics}  # as the loop's stability_report reads them
    report = Diagnostics(nn.Linear(1, 1), chance_loss=LN2).report([], counters)
    assert "Fired: collapse rollbacks 1." in summarize(report)
