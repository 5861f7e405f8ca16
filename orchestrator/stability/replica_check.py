"""Replica drift check: are the model replicas on all ranks still identical?

DDP keeps them equal only if every rank takes exactly the same steps. A cheap
fingerprint (sum and sum of squares of all parameters in float64), compared
with one MAX/MIN all-reduce per epoch, catches any divergence of control flow
(a rank that stepped alone) the epoch it happens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from orchestrator import metric_keys as mk
from orchestrator.stability.distributed import is_distributed


def parameter_fingerprint(model: torch.nn.Module) -> torch.Tensor:
    total = torch.zeros(2, dtype=torch.float64, device=next(model.parameters()).device)
    for p in model.parameters():
        d = p.detach().double()
        total[0] += d.sum()
        total[1] += (d * d).sum()
    return total


def replica_drift(model: torch.nn.Module) -> float:
    """Max over fingerprint components of (max over ranks - min over ranks); 0.0 when replicas agree."""
    fp = parameter_fingerprint(model)
    if not is_distributed():
        return 0.0 if torch.isfinite(fp).all() else float("nan")
    both = torch.cat([fp, -fp])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    hi, neg_lo = both.chunk(2)
    return float((hi + neg_lo).abs().max().item())


class ReplicaCheck:
    def on_epoch_end(self, state, metrics: dict) -> None:
        metrics[mk.REPLICA_DRIFT] = replica_drift(state.model)
