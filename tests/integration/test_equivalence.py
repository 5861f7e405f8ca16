"""The proof that synchronization is right: 2 workers x batch b with synchronized BN and clipping
give the same parameters as 1 worker x batch 2b on the same samples in the same order."""

import pytest
import ray.train
import ray.train.torch
import torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from orchestrator.spec import JobSpec
from orchestrator.stability.distributed import rank, world_size
from orchestrator.train.checkpointing import unwrap
from orchestrator.train.components import build_components
from orchestrator.train.loop import train_step

pytestmark = pytest.mark.integration
STEPS, GLOBAL_BATCH = 6, 16


def equivalence_loop(config):
    spec = JobSpec.model_validate(config["spec"])
    comps = build_components(spec, STEPS, torch.device("cpu"), ray.train.torch.prepare_model)
    g = torch.Generator().manual_seed(123)
    xs = torch.randn(STEPS * GLOBAL_BATCH, 64, generator=g) * 3 + 1  # off-centre: BN statistics matter
    ys = torch.randint(0, 10, (STEPS * GLOBAL_BATCH,), generator=g)
    per_rank = GLOBAL_BATCH // world_size()
    norms, init = [], {k: v.detach().clone() for k, v in unwrap(comps.state.model).state_dict().items()}
    for t in range(STEPS):
        lo = t * GLOBAL_BATCH + rank() * per_rank  # rank r takes the r-th slice of global batch t
        train_step(comps, {"x": xs[lo:lo + per_rank], "y": ys[lo:lo + per_rank]}, spec)
        norms.append(comps.state.grad_norm_value)
    if rank() == 0:
        torch.save({"params": {k: v.detach().clone() for k, v in unwrap(comps.state.model).state_dict().items()},
                    "norms": norms, "init": init, "types": sorted({type(m).__name__ for m in comps.state.model.modules()})},
                   config["out"])
    ray.train.report({"done": 1})


def fit(spec: JobSpec, workers: int, out, storage) -> dict:
    TorchTrainer(equivalence_loop, train_loop_config={"spec": spec.model_dump(mode="json"), "out": str(out)},
                 scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
                 run_config=RunConfig(name=f"eq{workers}", storage_path=str(storage))).fit()
    return torch.load(out)


@pytest.mark.timeout(300)
def test_two_workers_equal_one_worker_with_double_batch(ray_session, tmp_path):
    spec = JobSpec.model_validate({
        "model": {"kind": "resnet", "channels": [8, 16], "blocks_per_stage": 1, "zero_init_residual": False},
        "data": {"train": "unused", "val": "unused", "shape": [1, 8, 8], "num_classes": 10},
        "optimizer": {"name": "sgd", "lr": 0.2, "momentum": 0.9},
        "schedule": {"kind": "constant"},
        "regularization": {"weight_decay": 1e-3, "l2": 1e-3},
        "stability": {"clip": {"mode": "norm", "max_norm": 0.5}, "sync_batchnorm": True},
        "run": {"name": "eq"},
    })
    one = fit(spec, 1, tmp_path / "one.pt", tmp_path)
    two = fit(spec, 2, tmp_path / "two.pt", tmp_path)

    assert "KeelSyncBatchNorm" in two["types"] and "BatchNorm2d" in one["types"]
    assert max(one["norms"]) > 0.5, "clipping must be active for the test to mean anything"
    assert two["norms"] == pytest.approx(one["norms"], rel=1e-4)
    assert one["params"].keys() == two["params"].keys()
    for name, p1 in one["params"].items():
        if p1.is_floating_point():
            torch.testing.assert_close(two["params"][name], p1, rtol=1e-4, atol=1e-5, msg=name)
    # and the runs really trained: parameters moved well beyond the tolerance
    assert (one["params"]["stem.0.weight"] - one["init"]["stem.0.weight"]).abs().max() > 1e-2


@pytest.mark.timeout(300)
def test_without_sync_batchnorm_the_runs_differ(ray_session, tmp_path):
    """The control: per-rank BN statistics are not the global ones, so parameters drift apart."""
    spec = JobSpec.model_validate({
        "model": {"kind": "cnn", "channels": [8, 16]},
        "data": {"train": "unused", "val": "unused", "shape": [1, 8, 8], "num_classes": 10},
        "optimizer": {"name": "sgd", "lr": 0.2}, "schedule": {"kind": "constant"},
        "stability": {"sync_batchnorm": False}, "run": {"name": "eqc"},
    })
    one = fit(spec, 1, tmp_path / "one.pt", tmp_path)
    two = fit(spec, 2, tmp_path / "two.pt", tmp_path)
    diff = max((two["params"][k] - v).abs().max().item() for k, v in one["params"].items() if v.is_floating_point())
    assert diff > 1e-4
