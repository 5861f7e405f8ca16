
import pytest
import torch
from torch import nn

from orchestrator.spec import OptimizerSpec, RegularizationSpec, ScheduleSpec
from orchestrator.train.optim import build_optimizer, scaled_lr, split_decay_parameters, weight_penalty
from orchestrator.train.schedules import lr_curve

SPE, EPOCHS = 10, 10


def curve(**kw):
    return lr_curve(ScheduleSpec(**kw), 1.0, SPE, EPOCHS)


def test_warmup_is_linear_from_start_factor():
    lrs = curve(kind="constant", warmup_epochs=1, warmup_start_factor=0.1)
    assert lrs[0] == pytest.approx(0.1) and lrs[SPE] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:SPE], lrs[1:SPE + 1]))
    assert set(round(x, 9) for x in lrs[SPE:]) == {1.0}


def test_cosine_decays_to_min_ratio():
    lrs = curve(kind="cosine", min_lr_ratio=0.1)
    assert lrs[0] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b - 1e-12 for a, b in zip(lrs, lrs[1:]))


def test_step_and_exponential():
    step = curve(kind="step", step_epochs=3, gamma=0.5)
    assert step[3 * SPE - 1] == pytest.approx(1.0) and step[3 * SPE] == pytest.approx(0.5) and step[6 * SPE] == pytest.approx(0.25)
    exp = curve(kind="exponential", gamma=0.5)
    assert exp[SPE] == pytest.approx(0.5) and exp[2 * SPE] == pytest.approx(0.25)


def test_cyclic_stays_between_base_and_peak_and_returns():
    lrs = curve(kind="cyclic", cycle_epochs=2, base_lr_ratio=0.2)
    assert min(lrs) == pytest.approx(0.2) and max(lrs) == pytest.approx(1.0)
    assert lrs[0] == pytest.approx(0.2) and lrs[2 * SPE] == pytest.approx(0.2)  # one full cycle


def test_one_cycle_peaks_then_anneals():
    lrs = curve(kind="one_cycle")
    peak = lrs.index(max(lrs))
    assert max(lrs) == pytest.approx(1.0, rel=1e-3) and 0 < peak < len(lrs) // 2 and lrs[-1] < 0.01


def test_plateau_drops_on_stalled_val_loss():
    from orchestrator.train.schedules import build_schedule
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_schedule(opt, ScheduleSpec(kind="plateau", plateau_patience=1, plateau_factor=0.5), 5, 10)
    for loss in [1.0, 1.0, 1.0]:
        sched.epoch_end(loss, warmup_done=True)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)


def test_norms_and_biases_are_exempt_from_decay():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    decay, no_decay = split_decay_parameters(model)
    assert {id(p) for p in decay} == {id(model[0].weight), id(model[2].weight)}
    assert len(no_decay) == 4
    opt = build_optimizer(model, OptimizerSpec(name="adamw", lr=1e-3), RegularizationSpec(weight_decay=0.1))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    decay_all, _ = split_decay_parameters(model, exclude_norm_and_bias=False)
    assert len(decay_all) == 6


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                       ("adamw", torch.optim.AdamW), ("rmsprop", torch.optim.RMSprop)])
def test_each_optimizer(name, cls):
    opt = build_optimizer(nn.Linear(2, 2), OptimizerSpec(name=name, lr=0.01, nesterov=True), RegularizationSpec(), world_size=4)
    assert isinstance(opt, cls) and opt.param_groups[0]["lr"] == 0.01


def test_lr_scaling_rules():
    assert scaled_lr(0.1, "linear", 8) == pytest.approx(0.8)
    assert scaled_lr(0.1, "sqrt", 4) == pytest.approx(0.2)
    assert scaled_lr(0.1, "none", 64) == 0.1


def test_weight_penalty_values():
    w = [torch.tensor([1.0, -2.0]), torch.tensor([3.0])]
    assert weight_penalty(w, l1=0.1).item() == pytest.approx(0.6)
    assert weight_penalty(w, l2=0.1).item() == pytest.approx(0.5 * 0.1 * 14)
    assert weight_penalty(w) == 0.0
