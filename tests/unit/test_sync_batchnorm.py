"""Keel's synchronized BN against batch norm on the concatenated batch, with 2 real gloo processes."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from orchestrator.stability.sync_batchnorm import KeelSyncBatchNorm, chan_combine, convert_sync_batchnorm, sync_batch_norm
from tests.helpers import on_gloo_ranks

WORLD, PER_RANK, C = 2, 5, 3
OFF_CENTRE = [(1.0, 3.0), (100.0, 1.0), (1000.0, 1.0), (3000.0, 0.1)]  # (mean, std) of the activations


def _reference(mean=3.0, std=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(WORLD * PER_RANK, C, 4, 4, generator=g, dtype=torch.float64) * std + mean
    upstream = torch.randn(WORLD * PER_RANK, C, 4, 4, generator=g)
    weight, bias = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g)
    return x, upstream, weight, bias


def _mine(x, rank):
    return x[rank * PER_RANK:(rank + 1) * PER_RANK]


def _worker(rank):
    result = {}
    x, upstream, weight, bias = _reference()
    bn = KeelSyncBatchNorm(C)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    xs = _mine(x, rank).float().clone().requires_grad_(True)
    out = bn(xs)
    out.backward(_mine(upstream, rank) / WORLD)  # DDP averages over ranks
    grads = torch.stack([bn.weight.grad, bn.bias.grad])
    dist.all_reduce(grads)  # what DDP does to parameter grads
    bn.eval()
    # eval mode must not communicate: only rank 0 calls it, a collective would hang
    result["eval"] = bn(xs.detach()) if rank == 0 else None
    result.update(out=out.detach(), x_grad=xs.grad, wb_grad=grads, running=(bn.running_mean, bn.running_var))
    for mean, std in OFF_CENTRE:  # forward only, fp32 inputs, on each rank's slice
        xo = _reference(mean, std, seed=1)[0]
        result[f"off_{mean}_{std}"] = sync_batch_norm(_mine(xo, rank).float(), None, None, None, None, training=True)
    for momentum, track in ((None, True), (0.1, False)):  # drop-in: cumulative average, no running stats
        bn = KeelSyncBatchNorm(C, momentum=momentum, track_running_stats=track)
        outs = [bn(_mine(_reference(seed=s)[0], rank).float()) for s in range(3)]
        bn.eval()
        outs.append(bn(_mine(_reference(seed=9)[0], rank).float()))  # local batch stats when not tracking
        result[f"dropin_{momentum}_{track}"] = (outs, bn.running_mean, bn.running_var)
    return result


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return on_gloo_ranks(_worker, WORLD, tmp_path_factory.mktemp("syncbn"))


@pytest.mark.timeout(120)
def test_forward_backward_and_running_stats_match_batch_norm_on_the_global_batch(two_ranks):
    x, upstream, weight, bias = _reference()
    x = x.float().clone().requires_grad_(True)
    w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    rm, rv = torch.zeros(C), torch.ones(C)
    ref = F.batch_norm(x, rm, rv, w, b, training=True)
    ref.backward(upstream / WORLD)
    torch.testing.assert_close(torch.cat([r["out"] for r in two_ranks]), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in two_ranks]), x.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(two_ranks[0]["wb_grad"], torch.stack([w.grad, b.grad]), atol=1e-5, rtol=1e-5)
    for r in two_ranks:
        torch.testing.assert_close(r["running"][0], rm, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r["running"][1], rv, atol=1e-5, rtol=1e-5)
    expected_eval = F.batch_norm(x.detach()[:PER_RANK], rm, rv, weight, bias, training=False)
    torch.testing.assert_close(two_ranks[0]["eval"], expected_eval, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mean,std", OFF_CENTRE)
def test_exact_on_off_centre_activations(two_ranks, mean, std):
    """Against float64 batch norm of the concatenated batch, the error is no worse than 2x that of
    torch's own fp32 batch norm on the same fp32 inputs (sum/sum-of-squares gave 0.67 and 118)."""
    x64 = _reference(mean, std, seed=1)[0]
    exact = F.batch_norm(x64.float().double(), None, None, training=True)
    torch_error = (F.batch_norm(x64.float(), None, None, training=True).double() - exact).abs().max().item()
    ours = torch.cat([r[f"off_{mean}_{std}"] for r in two_ranks]).double()
    our_error = (ours - exact).abs().max().item()
    assert our_error <= 2 * torch_error + 1e-6, (our_error, torch_error)


@pytest.mark.parametrize("momentum,track", [(None, True), (0.1, False)])
def test_drop_in_for_batch_norm_momentum_none_and_untracked(two_ranks, momentum, track):
    reference = nn.BatchNorm2d(C, momentum=momentum, track_running_stats=track)
    expected = [reference(_reference(seed=s)[0].float()) for s in range(3)]
    reference.eval()
    eval_x = _reference(seed=9)[0].float()
    outs, running_mean, running_var = two_ranks[0][f"dropin_{momentum}_{track}"]
    for got, want in zip(outs[:3], expected):
        torch.testing.assert_close(got, want[:PER_RANK], atol=1e-5, rtol=1e-5)
    if track:
        torch.testing.assert_close(running_mean, reference.running_mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(running_var, reference.running_var, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(outs[3], reference(eval_x)[:PER_RANK], atol=1e-5, rtol=1e-5)
    else:
        assert running_mean is None and running_var is None
        local = nn.BatchNorm2d(C, track_running_stats=False).eval()  # eval uses this rank's own batch
        torch.testing.assert_close(outs[3], local(eval_x[:PER_RANK]), atol=1e-5, rtol=1e-5)


def test_single_process_computes_batch_norm_itself():
    """Without a process group the twin still runs its own statistics (it does not hand over to
    F.batch_norm in training), so this compares two implementations."""
    x = torch.randn(8, 3, 5, 5) * 4 + 50
    rm, rv = torch.zeros(3), torch.ones(3)
    mine_rm, mine_rv = rm.clone(), rv.clone()
    out = sync_batch_norm(x, mine_rm, mine_rv, None, None, training=True)
    torch.testing.assert_close(out, F.batch_norm(x, rm, rv, training=True), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close((mine_rm, mine_rv), (rm, rv))


def test_chan_combine_equals_statistics_of_the_whole():
    parts = [torch.randn(n, 4, dtype=torch.float64) * 3 + 7 for n in (3, 8, 5)]
    counts = torch.tensor([[float(len(p))] for p in parts], dtype=torch.float64)
    means = torch.stack([p.mean(0) for p in parts])
    m2s = torch.stack([((p - p.mean(0)) ** 2).sum(0) for p in parts])
    total, mean, var = chan_combine(counts, means, m2s)
    whole = torch.cat(parts)
    assert total.item() == 16
    torch.testing.assert_close(mean, whole.mean(0))
    torch.testing.assert_close(var, whole.var(0, unbiased=False))


def test_convert_swaps_every_batch_norm_and_keeps_its_state():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 4), nn.BatchNorm1d(4))
    with torch.no_grad():
        model[1].weight.fill_(2.0)
        model[1].running_mean.fill_(0.5)
    converted = convert_sync_batchnorm(model, use_cuda=False)
    kinds = [type(m) for m in converted.modules()]
    assert kinds.count(KeelSyncBatchNorm) == 2 and nn.BatchNorm2d not in kinds
    assert converted[1].weight[0].item() == 2.0 and converted[1].running_mean[0].item() == 0.5
