"""The Ray Data pipeline: read -> preprocess (deterministic, once, materialized) -> per epoch:
curriculum filter and augmentation (random, re-run every epoch) -> streamed into the workers.

Ray Data re-executes a dataset's plan every epoch, but the plan cannot know which epoch it is;
the run channel's epoch clock (ray_session.open_run_channel, set by every rank before it starts an
epoch) tells the per-epoch stage,
so augmentation and the per-block shuffle are seeded per (seed, epoch, block) and the curriculum
pool widens on schedule.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq

from orchestrator.data.augment import augment_batch, batch_seed
from orchestrator.data.preprocess import FEATURES, LABEL, PreprocessState, apply_preprocess
from orchestrator.data.scan import feature_matrix
from orchestrator.data.sources import IN_DRIVER_BYTES, resolve, size_of

DIFFICULTY = "difficulty"
BLOCK_BYTES = 64 * 2**20
DATA_TASK_CPUS = 0.5  # Ray Data tasks fit beside fractional workers; 1 CPU each (Ray's default) measured a deadlock
                      # on 2 cores once any other 0.5 CPU was held


def preprocess_batch(table, *, state: PreprocessState, features: list[str], label: str, difficulty: str | None,
                     score_checkpoint: str | None = None) -> dict:
    """The deterministic part, on a pyarrow batch (the same feature decoding as the driver's scan)."""
    raw, labels = feature_matrix(table, features), table.column(label).to_numpy(zero_copy_only=False)
    x, y, keep = apply_preprocess(raw, labels, state)
    out = {FEATURES: x, LABEL: y}
    if score_checkpoint:
        from orchestrator.data.scoring import checkpoint_losses
        out[DIFFICULTY] = checkpoint_losses(score_checkpoint, raw, labels.astype(np.int64))[keep]
    elif difficulty:
        out[DIFFICULTY] = table.column(difficulty).to_numpy(zero_copy_only=False).astype(np.float64)[keep]
    return out


def epoch_stage(batch: dict, *, clock, seed: int, shape: list[int], augment, limits: list[float] | None) -> dict:
    """The random, per-epoch part of the training split: curriculum filter, a seeded shuffle of the
    block's rows (cheaper than a local shuffle buffer), augmentation. Runs in Ray Data tasks; one small
    actor call per block."""
    import ray

    epoch = ray.get(clock.get.remote())
    x, y = batch[FEATURES], batch[LABEL]
    if limits is not None:
        keep = batch[DIFFICULTY] <= limits[min(epoch, len(limits) - 1)]
        x, y = x[keep], y[keep]
    if not len(x):
        return {FEATURES: x, LABEL: y}
    rng = np.random.default_rng(batch_seed(seed, epoch, x))
    order = rng.permutation(len(x))
    y = y[order]
    if augment is None:
        return {FEATURES: x[order], LABEL: y}
    xi, y = augment_batch(x.reshape(len(x), *shape), y, rng, augment, order=order)  # the shuffle's gather in the crop
    return {FEATURES: xi.reshape(len(x), -1), LABEL: y}


def preprocessed_split(path: str, columns: list[str], blocks: int, preprocess: dict):
    """A split read, preprocessed and cut into `blocks` blocks, materialized. A small local split is done
    here in the driver, in one pass with no Ray Data task (read tasks, a repartition and a materialize cost
    ~3 s of a run's start-up on 2 cores); a large or remote one by Ray Data's tasks."""
    import ray.data
    from ray.data.block import BlockAccessor

    path = resolve(path)
    if size_of(path) < IN_DRIVER_BYTES:
        batch = preprocess_batch(pq.read_table(path, columns=columns), **preprocess)
        rows = len(batch[LABEL])
        cuts = np.linspace(0, rows, num=min(blocks, max(rows, 1)) + 1).astype(int)
        # from_blocks: the metadata is read here; from_arrow asks a remote task for it (a worker process to start)
        return ray.data.from_blocks([BlockAccessor.batch_to_block({k: v[a:b] for k, v in batch.items()})
                                     for a, b in zip(cuts[:-1], cuts[1:])])
    ds = ray.data.read_parquet(path, columns=columns).map_batches(
        preprocess_batch, batch_format="pyarrow", num_cpus=DATA_TASK_CPUS, fn_kwargs=preprocess)
    return ds.repartition(blocks).materialize()


def build_datasets(spec, plan, clock=None, num_blocks: int | None = None) -> dict:
    data = spec.data
    features = data.feature_columns
    # Blocks of ~64 MiB, at least one per worker: measured on 2 cores, per-task overhead dominates small
    # blocks (8k 3x32x32 images, augmented: 2 blocks 20k samples/s, 16 blocks 10k/s, 32 blocks 6k/s).
    # A fixed count also keeps block boundaries, and so the per-block seeds, deterministic.
    train_bytes = max(plan.train_rows, 1) * math.prod(data.shape) * 4
    blocks = num_blocks or min(256, max(spec.scaling.max_workers, math.ceil(train_bytes / BLOCK_BYTES)))
    curriculum = data.curriculum.enabled
    out = {}
    paths = {"train": data.train, "val": data.val, **{f"val_{name}": path for name, path in data.extra_val.items()}}
    for split, path in paths.items():
        score_checkpoint = resolve(data.curriculum.checkpoint) if curriculum and split == "train" and data.curriculum.checkpoint else None
        difficulty = data.curriculum.score if curriculum and split == "train" and not score_checkpoint else None
        columns = [*features, data.label] + ([difficulty] if difficulty else [])
        # the deterministic part computed once; a fixed number of blocks keeps per-block seeds stable
        out[split] = preprocessed_split(path, columns, blocks, {
            "state": plan.preprocess, "features": features, "label": data.label, "difficulty": difficulty,
            "score_checkpoint": score_checkpoint})
    if clock is not None:
        out["train"] = out["train"].map_batches(
            epoch_stage, batch_format="numpy", batch_size=None, num_cpus=DATA_TASK_CPUS,
            fn_kwargs={"clock": clock, "seed": spec.run.seed, "shape": data.shape,
                       "augment": data.augment if data.augment.active else None,
                       "limits": plan.curriculum_limits if curriculum else None})
    return out
