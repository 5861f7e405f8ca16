"""Robust losses against hand-computed values."""

import math

import pytest
import torch

from orchestrator.spec import LossSpec
from orchestrator.train.losses import compute_loss

LOGITS = torch.tensor([[2.0, 0.0, -1.0]])
P = torch.softmax(LOGITS, 1)[0].tolist()  # [0.8438, 0.1142, 0.0420]


def test_cross_entropy_with_label_smoothing():
    spec = LossSpec(label_smoothing=0.3)
    target = [0.3 / 3] * 3
    target[1] += 0.7
    expected = -sum(t * math.log(p) for t, p in zip(target, P))
    assert compute_loss(LOGITS, torch.tensor([1]), spec).item() == pytest.approx(expected, rel=1e-6)


def test_symmetric_ce_is_alpha_ce_plus_beta_reverse_ce():
    spec = LossSpec(kind="symmetric_ce", sce_alpha=0.5, sce_beta=2.0, log_clamp=-4.0)
    ce = -math.log(P[1])
    reverse = -(P[0] * -4.0 + P[2] * -4.0 + P[1] * 0.0)  # log(0) clamped to -4 for the wrong classes
    assert compute_loss(LOGITS, torch.tensor([1]), spec).item() == pytest.approx(0.5 * ce + 2.0 * reverse, rel=1e-5)


def test_bootstrap_mixes_labels_with_the_models_own_prediction():
    spec = LossSpec(kind="bootstrap", bootstrap_beta=0.8)
    target = [0.2 * p for p in P]
    target[1] += 0.8
    expected = -sum(t * math.log(p) for t, p in zip(target, P))
    assert compute_loss(LOGITS, torch.tensor([1]), spec).item() == pytest.approx(expected, rel=1e-6)


def test_huber_is_bounded_where_cross_entropy_is_not():
    wrong = torch.tensor([[30.0, 0.0, 0.0]])  # confidently wrong: the label says class 2
    huber = compute_loss(wrong, torch.tensor([2]), LossSpec(kind="huber")).item()
    ce = compute_loss(wrong, torch.tensor([2]), LossSpec()).item()
    assert huber == pytest.approx(0.5 + 0.5, abs=1e-6)  # two probability errors of 1, each 0.5 * 1^2
    assert ce > 29


def test_soft_targets_work_for_every_loss():
    soft = torch.tensor([[0.5, 0.5, 0.0]])
    for kind in ("cross_entropy", "symmetric_ce", "bootstrap", "huber"):
        assert torch.isfinite(compute_loss(LOGITS, soft, LossSpec(kind=kind)))


def test_z_loss_adds_the_mean_squared_log_partition():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    targets = torch.tensor([0, 2])
    plain = compute_loss(logits, targets, LossSpec())
    with_z = compute_loss(logits, targets, LossSpec(z_loss=1e-2))
    log_z = [math.log(math.exp(2) + 1 + math.exp(-1)), math.log(2 * math.exp(0.5) + math.exp(3))]
    assert abs((with_z - plain).item() - 1e-2 * (log_z[0] ** 2 + log_z[1] ** 2) / 2) < 1e-6
    shifted = compute_loss(logits + 5.0, targets, LossSpec(z_loss=1e-2))  # same softmax, larger logits: penalised
    assert shifted > with_z and abs(compute_loss(logits + 5.0, targets, LossSpec()) - plain) < 1e-5
