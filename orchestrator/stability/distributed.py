"""Collective helpers that degrade to no-ops in a single process.

Every control-flow decision in Keel (skip, stop) goes through `agree_any`, so
all ranks act together; one rank acting alone would hang DDP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce (SUM by default); returns the tensor."""
    if is_distributed():
        dist.all_reduce(tensor, op=op)
    return tensor


def agree_any(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank if `flag` is true on any rank (all-reduce MAX). A host sync."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), rank order, on every rank."""
    if not is_distributed():
        return [obj]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, obj)
    return everyone


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` (picklable) on every rank; the others pass anything (None)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def broadcast_module_state(module: torch.nn.Module, src: int = 0) -> None:
    """Rank `src`'s parameters and buffers, copied in place into every rank's module."""
    if not is_distributed():
        return
    for tensor in module.state_dict().values():  # views of the live tensors: broadcast writes into them
        dist.broadcast(tensor, src=src)


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Rank `src`'s buffers (BN statistics and the like) into every rank's module, as DDP's forward does."""
    if not is_distributed():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=src)


class _DifferentiableAllReduceSum(torch.autograd.Function):
    """SUM all-reduce whose backward all-reduces the incoming gradient.

    torch.distributed.nn.functional.all_reduce does this but is deprecated in
    torch 2.13; the functional-collectives replacement is private API.
    """

    @staticmethod
    def forward(ctx, tensor):
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def differentiable_all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return tensor
    return _DifferentiableAllReduceSum.apply(tensor)
