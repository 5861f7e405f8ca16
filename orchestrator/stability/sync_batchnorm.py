"""Synchronized batch norm that works on every backend.

torch.nn.SyncBatchNorm refuses CPU tensors, so local gloo runs would silently
normalise each rank's slice with its own statistics. This one all-reduces the
per-channel sum, sum of squares and count through a differentiable all-reduce:
forward and backward then equal single-process batch norm on the concatenated
global batch. On CUDA, `convert_sync_batchnorm` uses torch's own (fused kernels).

Eval mode uses running statistics and never communicates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.stability.distributed import differentiable_all_reduce_sum, is_distributed


def sync_batch_norm(x: torch.Tensor, running_mean, running_var, weight, bias, *, training: bool,
                    momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor:
    """Batch norm of `x` (N, C, ...) with statistics over all ranks' batches (the plain-function twin)."""
    if not training or not is_distributed():
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    dims = [0] + list(range(2, x.dim()))
    xf = x.float()  # statistics in fp32 even under autocast
    count = xf.new_full((x.shape[1],), x.numel() / x.shape[1])
    stats = torch.cat([xf.sum(dim=dims), (xf * xf).sum(dim=dims), count])  # one collective for all three
    stats = differentiable_all_reduce_sum(stats)
    total_sum, total_sq, total_count = stats.chunk(3)
    mean = total_sum / total_count
    var = (total_sq / total_count - mean * mean).clamp_min(0)  # biased: what normalisation uses
    if running_mean is not None:
        with torch.no_grad():
            n = total_count[0]
            running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
            running_var.mul_(1 - momentum).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=momentum)
    shape = [1, -1] + [1] * (x.dim() - 2)
    out = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps)
    if weight is not None:
        out = out * weight.view(shape) + bias.view(shape)
    return out.to(x.dtype)


class KeelSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Drop-in for BatchNorm1d/2d whose training statistics span every rank."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D)")

    def forward(self, x):
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        return sync_batch_norm(x, self.running_mean if (not self.training or self.track_running_stats) else None,
                               self.running_var if (not self.training or self.track_running_stats) else None,
                               self.weight, self.bias, training=self.training,
                               momentum=self.momentum if self.momentum is not None else 0.1, eps=self.eps)


def convert_sync_batchnorm(module: nn.Module, use_cuda: bool) -> nn.Module:
    """Swap every BatchNorm for a synchronized one: torch's on CUDA, Keel's elsewhere."""
    if use_cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, KeelSyncBatchNorm):
        new = KeelSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                new.weight.copy_(module.weight)
                new.bias.copy_(module.bias)
        if module.track_running_stats:
            new.running_mean.copy_(module.running_mean)
            new.running_var.copy_(module.running_var)
            new.num_batches_tracked.copy_(module.num_batches_tracked)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, use_cuda))
    return module
