"""The user's own nn.Module (`model.kind: custom`): imported from the current directory, built with
model.args, keeping its own init unless one is named, and given Keel's synchronized BN and guards."""

import sys

import pytest
import torch

from orchestrator.errors import BadInput
from orchestrator.models import build_model
from orchestrator.models.custom import build_custom, check_custom_model, load_factory, parameters_without_gradient
from orchestrator.spec import parse_spec
from tests.helpers import ROOT
from tests.helpers import on_gloo_ranks

FACTORY = "examples.custom_model.tiny_convnet:build"


def custom_spec(**model):
    return parse_spec({"model": {"kind": "custom", "factory": FACTORY, **model},
                       "data": {"train": "t.parquet", "val": "v.parquet", "shape": [1, 8, 8], "num_classes": 10},
                       "run": {"name": "custom"}, "scaling": {"num_workers": 2}})


@pytest.fixture(autouse=True)
def from_the_repository_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # where a user runs keel from; the factory path is relative to it


def test_the_factory_gets_shape_num_classes_and_model_args():
    spec = custom_spec(args={"width": 8, "dropout": 0.3})
    net = build_model(spec.model, spec.data)
    assert type(net).__name__ == "TinyConvNet"
    assert net.features[0].out_channels == 8 and net.classifier[0].p == 0.3 and net.classifier[1].out_features == 10


def test_auto_init_keeps_the_users_own_and_a_named_scheme_replaces_it(tmp_path, monkeypatch):
    # a net without normalisation: the one where Keel's own `auto` would pick Kaiming for a zoo model
    (tmp_path / "keel_plain_net_xyz.py").write_text(
        "import torch\ndef make(shape, num_classes):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, num_classes))\n")
    monkeypatch.chdir(tmp_path)
    spec = custom_spec(factory="keel_plain_net_xyz:make")
    make = load_factory("keel_plain_net_xyz:make")

    torch.manual_seed(0)
    own = make(shape=(1, 8, 8), num_classes=10).state_dict()
    torch.manual_seed(0)
    auto = build_model(spec.model, spec.data).state_dict()
    torch.manual_seed(0)
    named = build_model(custom_spec(factory="keel_plain_net_xyz:make", init="kaiming_normal").model, spec.data).state_dict()
    assert all(torch.equal(own[k], auto[k]) for k in own)
    assert not torch.equal(own["1.weight"], named["1.weight"]) and torch.equal(named["1.bias"], torch.zeros(32))


def test_a_module_in_the_current_directory_is_found_without_being_installed(tmp_path, monkeypatch):
    (tmp_path / "keel_user_net_xyz.py").write_text(
        "import torch\ndef make(shape, num_classes, hidden=5):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(shape[0], hidden), torch.nn.Linear(hidden, num_classes))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    net = build_custom("keel_user_net_xyz:make", [4], 3, {"hidden": 7})
    check_custom_model(net, "keel_user_net_xyz:make", [4], 3)
    assert net[1].out_features == 7


@pytest.mark.parametrize("num_classes, shape, message", [
    (7, [1, 8, 8], None),                                   # sized by the data spec: fine
    (10, [3, 8, 8], "forward failed on a batch of shape (2, 3, 8, 8)"),
])
def test_the_dry_forward_checks_input_and_output_shapes(num_classes, shape, message):
    net = build_custom(FACTORY, [1, 8, 8], num_classes, {})
    if message is None:
        check_custom_model(net, FACTORY, shape, num_classes)
    else:
        with pytest.raises(BadInput, match=r"^model\.factory: .*" + message.replace("(", r"\(").replace(")", r"\)")):
            check_custom_model(net, FACTORY, shape, num_classes)
    net = build_custom(FACTORY, [1, 8, 8], 10, {})
    with pytest.raises(BadInput, match=r"expected logits of shape \(2, 5\) \(data.num_classes\)"):
        check_custom_model(net, FACTORY, [1, 8, 8], 5)


def _components_on_rank(rank):
    from orchestrator.stability.clipping import GradClipper
    from orchestrator.stability.sync_batchnorm import KeelSyncBatchNorm
    from orchestrator.train.components import build_components

    import os
    os.chdir(ROOT)
    comps = build_components(custom_spec(), steps_per_epoch=4, device=torch.device("cpu"))
    norms = [type(m).__name__ for m in comps.state.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    clipper = comps.safeguards.find(GradClipper)
    return {"norms": norms, "synced": all(isinstance(m, KeelSyncBatchNorm) for m in comps.state.model.modules()
                                          if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)),
            "clip_mode": clipper.mode if clipper else None}


def test_on_two_ranks_the_custom_models_batch_norms_are_synchronized_and_clipping_applies(tmp_path):
    for result in on_gloo_ranks(_components_on_rank, 2, tmp_path):
        assert len(result["norms"]) == 2 and result["synced"], result
        assert result["clip_mode"] == "zscore"  # auto: the model normalises, so z-score rather than AGC


class WithUnusedHead(torch.nn.Module):
    """A user's model with an auxiliary head that forward never calls."""

    def __init__(self, inputs: int, num_classes: int):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(inputs, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU())
        self.head, self.aux = torch.nn.Linear(16, num_classes), torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.body(x))


def with_unused_head(shape, num_classes):
    return WithUnusedHead(64, num_classes)


class AuxOnRankOne(WithUnusedHead):
    """A model whose forward differs by rank (its auxiliary head only on rank 1): each rank's own probe would differ."""

    def forward(self, x):
        import torch.distributed as dist

        h = self.body(x)
        return self.head(h) + (self.aux(h)[:, :1] * 0 if dist.get_rank() == 1 else 0)


def aux_on_rank_one(shape, num_classes):
    return AuxOnRankOne(64, num_classes)


def like_ray_train(model, parallel_strategy_kwargs=None):  # ray.train.torch.prepare_model's DDP, on CPU
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, **(parallel_strategy_kwargs or {}))


def _two_ddp_steps_on_rank(rank):
    from orchestrator.train.components import build_components

    import os
    os.chdir(ROOT)
    out = {}
    for setting, factory in (("auto", "with_unused_head"), (False, "with_unused_head"), ("auto", "aux_on_rank_one")):
        spec = parse_spec({**custom_spec(factory=f"tests.unit.test_custom_model:{factory}").model_dump(),
                           "scaling": {"num_workers": 2, "find_unused_parameters": setting}})
        comps = build_components(spec, steps_per_epoch=4, device=torch.device("cpu"), prepare_model=like_ray_train)
        try:
            for step in range(2):  # DDP refuses an unused parameter at the second forward
                x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(step * 2 + rank))
                torch.nn.functional.cross_entropy(comps.state.model(x), torch.tensor([0, 1, 2, 3])).backward()
                comps.state.optimizer.step()
                comps.state.optimizer.zero_grad()
            out[f"{setting} {factory}"] = {"unused": comps.unused_parameters, "error": None}
        except RuntimeError as exc:
            out[f"{setting} {factory}"] = {"unused": comps.unused_parameters, "error": str(exc).splitlines()[0]}
    return out


def test_a_custom_model_with_a_parameter_it_never_uses_trains_under_ddp_and_is_named():
    net = with_unused_head([1, 8, 8], 10).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert parameters_without_gradient(net, [1, 8, 8]) == ["aux.weight", "aux.bias"]
    assert parameters_without_gradient(net, [1, 8, 8], frozen=("aux.",)) == []  # frozen: not trained anyway
    # the model as it was: no gradient left, BN statistics and step count put back, still in eval mode
    assert all(p.grad is None for p in net.parameters()) and not net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_on_two_ranks_ddp_searches_for_the_unused_parameters_that_auto_found(tmp_path):
    for result in on_gloo_ranks(_two_ddp_steps_on_rank, 2, tmp_path):
        assert result["auto with_unused_head"] == {"unused": ("aux.weight", "aux.bias"), "error": None}, result
        assert result["False with_unused_head"]["unused"] == () and "finished reduction" in result["False with_unused_head"]["error"]
        # rank 0's verdict on every rank (rank 1's own probe finds the head used), and both train
        assert result["auto aux_on_rank_one"] == {"unused": ("aux.weight", "aux.bias"), "error": None}, result
