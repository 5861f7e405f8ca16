"""Plain PyTorch baselines for benchmarks.overhead: DDP on gloo under torchrun, or one process.

    torchrun --nproc_per_node 2 -m benchmarks.plain_ddp WORKDIR EPOCHS BATCH OUT.json
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from benchmarks.common import gloo_group
from orchestrator.models import build_model
from orchestrator.spec import ModelSpec, DataSpec


def train(workdir: str, epochs: int, batch: int, distributed: bool) -> list[float]:
    """samples/s of each epoch (training only)."""
    table = pq.read_table(f"{workdir}/train.parquet")
    x = torch.from_numpy(np.stack(table["image"].to_numpy(zero_copy_only=False)).astype(np.float32)).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(table["label"].to_numpy().copy())
    dataset = torch.utils.data.TensorDataset(x, y)
    world = 1
    torch.manual_seed(0)
    model = build_model(ModelSpec(channels=[32, 64], blocks_per_stage=1), DataSpec(train="-", val="-", shape=[1, 8, 8], num_classes=10))
    if distributed:  # inside benchmarks.common.gloo_group
        world = torch.distributed.get_world_size()
        model = torch.nn.parallel.DistributedDataParallel(model)
        sampler = torch.utils.data.distributed.DistributedSampler(dataset, shuffle=True)
    else:
        sampler = torch.utils.data.RandomSampler(dataset)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    rates = []
    for epoch in range(epochs):
        if distributed:
            sampler.set_epoch(epoch)
        start, samples = time.perf_counter(), 0
        for xb, yb in loader:
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            samples += len(xb) * world
        rates.append(samples / (time.perf_counter() - start))
    return rates


if __name__ == "__main__":
    workdir, epochs, batch, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    with gloo_group():  # torchrun's env:// rendezvous
        rates = train(workdir, epochs, batch, distributed=True)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out, "w") as f:
            json.dump(rates, f)
