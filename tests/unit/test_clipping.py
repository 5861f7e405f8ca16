import math

import pytest
import torch

from orchestrator.stability.clipping import GradClipper, clip_gradients


def params_with_grads(*grads):
    ps = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros(len(g)))
        p.grad = torch.tensor(g, dtype=torch.float32)
        ps.append(p)
    return ps


def test_norm_mode_returns_preclip_norm_and_scales_to_max_norm():
    ps = params_with_grads([3.0, 0.0], [0.0, 4.0])  # global norm 5
    norm = clip_gradients(ps, "norm", max_norm=1.0)
    assert norm.item() == pytest.approx(5.0)
    assert ps[0].grad.tolist() == pytest.approx([0.6, 0.0], rel=1e-5)
    assert ps[1].grad.tolist() == pytest.approx([0.0, 0.8], rel=1e-5)


def test_norm_mode_leaves_small_gradients_alone():
    ps = params_with_grads([0.3, 0.4])
    assert clip_gradients(ps, "norm", max_norm=1.0).item() == pytest.approx(0.5)
    assert ps[0].grad.tolist() == pytest.approx([0.3, 0.4])


def test_value_mode_clamps_elementwise_and_still_reports_norm():
    ps = params_with_grads([3.0, -0.5], [-4.0])
    norm = clip_gradients(ps, "value", max_value=1.0)
    assert norm.item() == pytest.approx(math.sqrt(9 + 0.25 + 16))
    assert ps[0].grad.tolist() == [1.0, -0.5] and ps[1].grad.tolist() == [-1.0]


def test_none_mode_measures_only():
    ps = params_with_grads([30.0, 40.0])
    assert clip_gradients(ps, "none").item() == pytest.approx(50.0)
    assert ps[0].grad.tolist() == [30.0, 40.0]


def test_nonfinite_gradient_gives_nonfinite_norm():
    ps = params_with_grads([float("nan"), 1.0])
    assert not torch.isfinite(clip_gradients(ps, "norm"))


class FakeScaler:
    unscaled = False

    def unscale_(self, optimizer):
        self.unscaled = True


def test_clipper_unscales_before_clipping_and_records_norm():
    model = torch.nn.Linear(2, 1, bias=False)
    model.weight.grad = torch.tensor([[6.0, 8.0]])
    state = type("S", (), {"model": model, "optimizer": None, "scaler": FakeScaler(), "grad_norm": None})()
    GradClipper("norm", max_norm=2.0).after_backward(state)
    assert state.scaler.unscaled and state.grad_norm.item() == pytest.approx(10.0)
    assert model.weight.grad.norm().item() == pytest.approx(2.0, rel=1e-5)
