"""Validation on 2 real gloo ranks under DDP, with shares of the split that differ (one of them empty)."""

import torch

from orchestrator.data.preprocess import FEATURES, LABEL
from orchestrator.spec import parse_spec
from tests.helpers import on_gloo_ranks


class Shard:
    """A rank's share of a validation split as the loop reads it (`iter_torch_batches` chunks)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def iter_torch_batches(self, batch_size, drop_last, prefetch_batches):
        for start in range(0, len(self.y), batch_size):
            yield {FEATURES: self.x[start:start + batch_size], LABEL: self.y[start:start + batch_size]}


def _evaluate_on_rank(rank):
    from torch.nn.parallel import DistributedDataParallel

    from orchestrator.train.components import build_components
    from orchestrator.train.loop import evaluate

    # per-rank BN (each rank's running statistics its own), so that which rank's statistics evaluate shows
    spec = parse_spec({"model": {"kind": "mlp", "hidden": [8]}, "run": {"name": "eval"},
                       "data": {"train": "t", "val": "v", "shape": [4], "num_classes": 3, "batch_size": 2},
                       "stability": {"sync_batchnorm": False}})
    comps = build_components(spec, 4, torch.device("cpu"), prepare_model=DistributedDataParallel)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(rank))
    comps.state.model(x).sum().backward()  # one training forward, as before any evaluation
    generator = torch.Generator().manual_seed(10)
    x_all, y_all = torch.randn(21, 4, generator=generator), torch.randint(0, 3, (21,), generator=generator)
    mine = slice(0, 0) if rank == 0 else slice(0, 21)  # rank 0's share is empty: the split had fewer blocks than ranks
    metrics = evaluate(comps, Shard(x_all[mine], y_all[mine]), spec)
    whole = comps.state.model.module.eval()
    with torch.no_grad():  # rank 0's model (its BN statistics, as DDP's forward gives every rank) on the whole split
        expected = torch.nn.functional.cross_entropy(whole(x_all), y_all).item()
    return {"metrics": metrics, "expected": expected}


def test_a_rank_with_nothing_to_validate_does_not_hang_its_peer(tmp_path):
    """DDP's first forward after a training step broadcasts rank 0's buffers: a rank with no validation batch
    never joined it, and the run hung (a 1-row validation split on 2 workers)."""
    results = on_gloo_ranks(_evaluate_on_rank, 2, tmp_path)
    assert results[0]["metrics"] == results[1]["metrics"]  # the same numbers on every rank
    assert abs(results[0]["metrics"]["val_loss"] - results[0]["expected"]) < 1e-5, results
