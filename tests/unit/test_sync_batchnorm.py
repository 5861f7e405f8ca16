"""Keel's synchronized BN against F.batch_norm on the concatenated batch, with 2 real gloo processes."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from orchestrator.stability.sync_batchnorm import KeelSyncBatchNorm, convert_sync_batchnorm, sync_batch_norm

WORLD, PER_RANK, C = 2, 5, 3


def _reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(WORLD * PER_RANK, C, 4, 4, generator=g) * 2 + 3
    upstream = torch.randn(WORLD * PER_RANK, C, 4, 4, generator=g)
    weight, bias = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g)
    return x, upstream, weight, bias


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    x, upstream, weight, bias = _reference()
    bn = KeelSyncBatchNorm(C)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    xs = x[rank * PER_RANK:(rank + 1) * PER_RANK].clone().requires_grad_(True)
    out = bn(xs)
    out.backward(upstream[rank * PER_RANK:(rank + 1) * PER_RANK] / WORLD)  # DDP averages over ranks
    grads = torch.stack([bn.weight.grad, bn.bias.grad])
    dist.all_reduce(grads)  # what DDP does to parameter grads
    bn.eval()
    if rank == 0:  # eval mode must not communicate: only rank 0 calls it, a collective would hang
        eval_out = bn(xs.detach())
    else:
        eval_out = None
    dist.barrier()
    torch.save({"out": out.detach(), "x_grad": xs.grad, "wb_grad": grads, "running": (bn.running_mean, bn.running_var),
                "eval": eval_out}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_forward_backward_and_running_stats_match_batch_norm_on_the_global_batch(tmp_path):
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    x, upstream, weight, bias = _reference()
    x = x.clone().requires_grad_(True)
    w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    rm, rv = torch.zeros(C), torch.ones(C)
    ref = F.batch_norm(x, rm, rv, w, b, training=True)
    ref.backward(upstream / WORLD)
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]
    torch.testing.assert_close(torch.cat([r["out"] for r in results]), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in results]), x.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[0]["wb_grad"], torch.stack([w.grad, b.grad]), atol=1e-5, rtol=1e-5)
    for r in results:
        torch.testing.assert_close(r["running"][0], rm, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r["running"][1], rv, atol=1e-5, rtol=1e-5)
    expected_eval = F.batch_norm(x.detach()[:PER_RANK], rm, rv, weight, bias, training=False)
    torch.testing.assert_close(results[0]["eval"], expected_eval, atol=1e-5, rtol=1e-5)


def test_single_process_equals_plain_batch_norm():
    x = torch.randn(8, 3, 5, 5)
    rm, rv = torch.zeros(3), torch.ones(3)
    out = sync_batch_norm(x, rm.clone(), rv.clone(), None, None, training=True)
    torch.testing.assert_close(out, F.batch_norm(x, rm, rv, training=True))


def test_convert_swaps_every_batch_norm_and_keeps_its_state():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 4), nn.BatchNorm1d(4))
    with torch.no_grad():
        model[1].weight.fill_(2.0)
        model[1].running_mean.fill_(0.5)
    converted = convert_sync_batchnorm(model, use_cuda=False)
    kinds = [type(m) for m in converted.modules()]
    assert kinds.count(KeelSyncBatchNorm) == 2 and nn.BatchNorm2d not in kinds
    assert converted[1].weight[0].item() == 2.0 and converted[1].running_mean[0].item() == 0.5
