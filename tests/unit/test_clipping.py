import math

import pytest
import torch

from orchestrator.spec import ClipSpec
from orchestrator.stability.adaptive_clipping import agc_clip_, unitwise_norm, zscore_clip_
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


def test_clipper_unscales_before_clipping_and_records_norm():
    """A real GradScaler (scale 1024): clipping must see the true gradients. Clipping the scaled ones
    and unscaling after would record a norm of 10240 and leave the gradient at 2/1024."""
    model = torch.nn.Linear(2, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(model.weight.sum() * 0 + torch.tensor([6.0, 8.0]) @ model.weight[0]).backward()  # grad = 1024 x [6, 8]
    assert model.weight.grad.norm().item() == pytest.approx(10240.0)
    state = type("S", (), {"model": model, "optimizer": optimizer, "scaler": scaler, "grad_norm": None, "device": "cpu"})()
    GradClipper(ClipSpec(mode="norm", max_norm=2.0)).clip(state)
    assert state.grad_norm.item() == pytest.approx(10.0)
    assert model.weight.grad.norm().item() == pytest.approx(2.0, rel=1e-5)
    scaler.step(optimizer)  # the scaler knows this optimizer is unscaled already: no second division
    scaler.update()


def test_agc_clips_each_unit_to_lambda_times_its_weight_norm():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))  # unit norms 5 and 0 (floored to eps)
    w.grad = torch.tensor([[0.3, 0.4], [1.0, 0.0]])                 # unit grad norms 0.5 and 1.0
    agc_clip_([w], clipping=0.01, eps=1e-3)
    # unit 0: max 0.01*5 = 0.05 < 0.5 -> scaled by 0.1; unit 1: max 0.01*1e-3 = 1e-5 -> scaled to norm 1e-5
    assert w.grad[0].tolist() == pytest.approx([0.03, 0.04], rel=1e-5)
    assert w.grad[1].tolist() == pytest.approx([1e-5, 0.0], rel=1e-4)


def test_agc_leaves_small_updates_and_treats_vectors_as_one_unit():
    b = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    b.grad = torch.tensor([0.01, 0.02])                           # norm 0.0224 < 0.01*5*... lambda 0.1 -> 0.5
    agc_clip_([b], clipping=0.1)
    assert b.grad.tolist() == pytest.approx([0.01, 0.02])
    assert unitwise_norm(torch.ones(2, 3, 2, 2)).flatten().tolist() == pytest.approx([12 ** 0.5, 12 ** 0.5])


def test_clipper_excludes_the_classifier_from_agc():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0)
    state = type("S", (), {"model": model, "optimizer": None, "scaler": None, "device": "cpu"})()
    GradClipper(ClipSpec(mode="agc"), {id(p) for p in model[1].parameters()}).clip(state)
    assert model[1].weight.grad.eq(10.0).all() and model[0].weight.grad.abs().max() < 1.0


def test_zscore_clip_hand_computed():
    p = torch.nn.Parameter(torch.zeros(1))
    mean, var = torch.tensor(2.0), torch.tensor(0.25)              # bound = 2 + 3 * 0.5 = 3.5
    p.grad = torch.tensor([7.0])
    bound = zscore_clip_([p], torch.tensor(7.0), mean, var, z=3.0, beta=0.5)
    assert bound.item() == pytest.approx(3.5) and p.grad.item() == pytest.approx(3.5)
    # the EMA learned the clipped norm 3.5, not 7: mean 2 + 0.5*1.5 = 2.75; var 0.5*(0.25 + 0.5*1.5^2) = 0.6875
    assert mean.item() == pytest.approx(2.75) and var.item() == pytest.approx(0.6875)
    p.grad = torch.tensor([1.0])
    zscore_clip_([p], torch.tensor(1.0), mean, var, z=3.0, beta=0.5)
    assert p.grad.item() == 1.0                                     # below the bound: untouched


def test_zscore_clip_warmup_uses_fixed_norm_and_learns_raw_norms():
    p = torch.nn.Parameter(torch.zeros(1))
    p.grad = torch.tensor([4.0])
    mean, var = torch.zeros(()), torch.zeros(())
    zscore_clip_([p], torch.tensor(4.0), mean, var, fallback_max_norm=1.0)
    assert p.grad.item() == pytest.approx(1.0) and mean.item() == 4.0 and var.item() == 0.0


def test_auto_clip_mode_is_agc_for_normaliser_free_feed_forward_nets_else_zscore():
    from orchestrator.stability.clipping import resolve_clip_mode

    plain_mlp = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with_bn = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    with_ln = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    recurrent = torch.nn.ModuleList([torch.nn.LSTM(4, 4), torch.nn.Linear(4, 2)])
    assert resolve_clip_mode("auto", plain_mlp) == "agc"
    assert [resolve_clip_mode("auto", m) for m in (with_bn, with_ln, recurrent)] == ["zscore"] * 3
    assert resolve_clip_mode("norm", plain_mlp) == "norm"  # an explicit choice is kept
    assert GradClipper(ClipSpec(), model=with_bn).mode == "zscore"


def test_zscore_clipper_state_is_json_and_resumes_where_it_left_off():
    import json

    def fresh_state():
        model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.5)
        return type("S", (), {"model": model, "optimizer": None, "scaler": None, "device": "cpu"})()

    clipper = GradClipper(ClipSpec(), model=fresh_state().model)
    for _ in range(3):
        clipper.clip(fresh_state())
    saved = json.loads(json.dumps(clipper.state_dict()))  # checkpoints keep guard state as plain numbers
    resumed = GradClipper(ClipSpec(), model=fresh_state().model)
    resumed.load_state_dict(saved)
    clipper.clip(fresh_state())
    resumed.clip(fresh_state())
    assert resumed.state_dict() == clipper.state_dict() and resumed.seen == 4
