"""Augmented ingest: Keel's Ray Data pipeline vs. a torch DataLoader applying the same transforms.

Both read the same synthetic 3x32x32 Parquet split, standardise with the same statistics and run the
same `augment_batch` (random crop with padding 4 and horizontal flip); the DataLoader uses one worker
process per CPU. Measured: samples/s over full epochs after one warm-up epoch, alternating the two.
Target: Ray Data / DataLoader >= 1.0.

    python -m benchmarks.data_ingest [--rows N] [--epochs E] [--batch B]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import ray
import torch

from benchmarks.common import keel_train_pipeline, machine, median, save, table
from orchestrator.data.augment import augment_batch, batch_seed
from orchestrator.data.batches import row_bytes, shard_batches
from orchestrator.data.generators import make_synthetic
from orchestrator.data.preprocess import apply_preprocess
from orchestrator.data.scan import feature_matrix
from orchestrator.spec import AugmentSpec, load_spec

AUGMENT = AugmentSpec(random_crop_padding=4, hflip=0.5)


class AugmentingCollate:
    """What a hand-written torch pipeline does: collate a batch, augment it (same transforms, same seeding)."""

    def __init__(self, x, y, shape, seed=0):
        self.x, self.y, self.shape, self.seed, self.epoch = x, y, shape, seed, 0

    def __call__(self, indices):
        idx = np.asarray(indices)
        xb = self.x[idx].reshape(len(idx), *self.shape)
        rng = np.random.default_rng(batch_seed(self.seed, self.epoch, xb))
        xb, yb = augment_batch(xb, self.y[idx], rng, AUGMENT)
        return torch.from_numpy(xb), torch.from_numpy(yb)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=8000)
    parser.add_argument("--epochs", type=int, default=3, help="measured epochs per pipeline (after 1 warm-up)")
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="keel-ingest-")
    make_synthetic(workdir, rows=args.rows, shape=(3, 32, 32))
    spec = load_spec("jobs/synthetic-resnet.yaml", [f"data.train={workdir}/train.parquet", f"data.val={workdir}/val.parquet",
                                                  "data.augment.random_crop_padding=4", "data.augment.hflip=0.5"])
    plan, clock, train = keel_train_pipeline(spec)

    import pyarrow.parquet as pq
    raw = pq.read_table(spec.data.train)
    x, y, _ = apply_preprocess(feature_matrix(raw, ["image"]), raw.column("label").to_numpy(), plan.preprocess)
    collate = AugmentingCollate(x, y, spec.data.shape)
    loader = torch.utils.data.DataLoader(range(len(x)), batch_size=args.batch, shuffle=True, collate_fn=collate,
                                         num_workers=os.cpu_count(), persistent_workers=True, prefetch_factor=4)

    def ray_epoch(epoch):
        ray.get(clock.set.remote(epoch))
        batches = shard_batches(train, args.batch, row_bytes=row_bytes(spec.data), drop_last=False,  # the loop's own path
                                shuffle_rows=spec.data.shuffle_buffer, seed=epoch, prefetch_batches=4)
        return sum(len(b["y"]) for b in batches)

    def torch_epoch(epoch):
        collate.epoch = epoch
        return sum(len(yb) for _, yb in loader)

    rates = {"Ray Data (Keel)": [], "torch DataLoader": []}
    for epoch in range(args.epochs + 1):
        for name, fn in (("Ray Data (Keel)", ray_epoch), ("torch DataLoader", torch_epoch)):
            start = time.perf_counter()
            n = fn(epoch)
            if epoch > 0:  # epoch 0 warms both up (worker start, first task)
                rates[name].append(n / (time.perf_counter() - start))
    ray_rate, torch_rate = median(rates["Ray Data (Keel)"]), median(rates["torch DataLoader"])
    result = {"rows": len(x), "batch": args.batch, "samples_per_s": {"ray_data": ray_rate, "dataloader": torch_rate},
              "ratio_ray_over_dataloader": ray_rate / torch_rate, "target": 1.0}
    print(f"augmented ingest, synthetic 3x32x32, {len(x)} rows, crop(pad 4) + hflip ({machine()})\n")
    print(table(["pipeline", "samples/s (median of epochs)"], [["Ray Data (Keel)", f"{ray_rate:.0f}"],
                                                               ["torch DataLoader", f"{torch_rate:.0f}"],
                                                               ["**ratio**", f"**{ray_rate / torch_rate:.2f}** (target >= 1.0)"]]))
    print(f"\nwrote {save('data_ingest', result)}")
    return result


if __name__ == "__main__":
    main()
