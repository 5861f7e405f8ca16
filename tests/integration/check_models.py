"""Models with distributed bugs, for `keel check` to catch (imported by the workers from the test's cwd)."""

import torch
import torch.distributed as dist
from torch import nn


class RankNoise(nn.Module):
    """Adds training noise from a generator seeded by the rank: the mistake of seeding per process."""

    def forward(self, x):
        if not self.training:
            return x
        rank = dist.get_rank() if dist.is_initialized() else 0
        g = torch.Generator().manual_seed(1234 + rank)
        return x + 0.1 * torch.randn(x.shape, generator=g)


def rank_noise_net(shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), RankNoise(), nn.ReLU(), nn.Linear(64, num_classes))
