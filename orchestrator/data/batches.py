"""Batches for the step, cut in the worker from large chunks that Ray Data streams in.

Why: Ray Data's per-batch cost (the numpy -> torch conversion, the local shuffle buffer's copies) is
paid per batch that `iter_torch_batches` hands out. Measured inside 2 Ray Train workers on this 2-core
machine (`python -m benchmarks.data_path`, benchmarks/RESULTS.md): batches of 32 through a 512-row shuffle
buffer 11.7k rows/s per worker, chunks of 2,048 rows permuted and sliced here 29.3k rows/s. A slice is a
view and the shuffle one `randperm` per chunk, so both cost next to nothing.

The shuffle: rows are permuted within each chunk (at least `shuffle_rows` rows), by a generator seeded
per (seed, epoch, rank); the per-epoch pipeline stage already permutes each block (data/pipeline.py).
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

CHUNK_BYTES = 8 * 2**20  # per fetched chunk: large enough to amortise Ray Data's per-batch cost
MAX_BATCHES_PER_CHUNK = 64  # and small enough that the first step does not wait for a huge fetch


def row_bytes(data_spec) -> int:
    """Bytes of one row as the pipeline delivers it: float32 features and a label."""
    return 4 * (math.prod(data_spec.shape) + 1)


def chunk_rows(batch_size: int, row_bytes: int, shuffle_rows: int = 0) -> int:
    """Rows per fetched chunk: a whole number of batches, ~CHUNK_BYTES, and at least the shuffle window."""
    batches = max(1, min(MAX_BATCHES_PER_CHUNK, CHUNK_BYTES // max(1, row_bytes * batch_size)))
    batches = max(batches, math.ceil(shuffle_rows / batch_size))
    return batches * batch_size


def slice_batches(chunks, batch_size: int, *, drop_last: bool, shuffle: torch.Generator | None = None) -> Iterator[dict]:
    """Cut dicts of equal-length tensors into `batch_size` rows, carrying a short remainder into the next
    chunk so that every batch but (at most) the last is full; `drop_last` drops that last short one."""
    carry: dict | None = None
    for chunk in chunks:
        n = len(next(iter(chunk.values())))
        if shuffle is not None:
            order = torch.randperm(n, generator=shuffle)
            chunk = {k: v[order] for k, v in chunk.items()}
        if carry is not None:
            chunk = {k: torch.cat([carry[k], v]) for k, v in chunk.items()}
            n += len(carry[next(iter(carry))])
        full = n // batch_size * batch_size
        for start in range(0, full, batch_size):
            yield {k: v[start:start + batch_size] for k, v in chunk.items()}
        carry = {k: v[full:] for k, v in chunk.items()} if full < n else None
    if carry is not None and not drop_last:
        yield carry


def shard_batches(shard, batch_size: int, *, row_bytes: int, drop_last: bool, shuffle_rows: int = 0,
                  seed: int = 0, prefetch_batches: int = 1) -> Iterator[dict]:
    """`shard.iter_torch_batches(batch_size, ...)`, fetched in chunks and sliced here (see the module doc).
    `prefetch_batches` counts step batches; Ray prefetches whole chunks, at least one."""
    rows = chunk_rows(batch_size, row_bytes, shuffle_rows)
    prefetch = max(1, math.ceil(prefetch_batches * batch_size / rows))
    shuffle = torch.Generator().manual_seed(seed) if shuffle_rows else None
    chunks = shard.iter_torch_batches(batch_size=rows, drop_last=False, prefetch_batches=prefetch)
    return slice_batches(chunks, batch_size, drop_last=drop_last, shuffle=shuffle)
