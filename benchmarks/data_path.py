"""Where the data path's time goes: rows/s per worker of each way of reading the same Ray Data shard,
inside 2 real Ray Train workers, with no training (the step's own cost is benchmarks.overhead's business).

The shard is Keel's own training pipeline (data/pipeline.py: preprocessed, materialized blocks, then the
per-epoch stage that shuffles and augments each block), the main job's batch of 32. Stages, each read
for --epochs epochs in turn, in every round (A B C D E, A B C D E, ...):

  numpy_b32        iter_batches(32, numpy): Ray's batching alone
  torch_b32        iter_torch_batches(32): + the numpy -> torch conversion
  torch_b32_shuf   iter_torch_batches(32, local_shuffle_buffer_size=512): Keel's path before 2026-11-22
  keel_chunks      data/batches.py: chunks of 2,048 rows fetched, permuted and sliced in the worker (Keel now)
  whole_blocks     iter_torch_batches(None): whole blocks, sliced (the upper bound of fetching bigger)

    python -m benchmarks.data_path [--rows N] [--epochs E] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.common import keel_train_pipeline, machine, median, save, table

BATCH = 32


def stages(shard, row_bytes: int) -> dict:
    from orchestrator.data.batches import shard_batches, slice_batches

    return {
        "numpy_b32": lambda: shard.iter_batches(batch_size=BATCH, batch_format="numpy", prefetch_batches=2),
        "torch_b32": lambda: shard.iter_torch_batches(batch_size=BATCH, drop_last=True, prefetch_batches=2),
        "torch_b32_shuf": lambda: shard.iter_torch_batches(batch_size=BATCH, drop_last=True, prefetch_batches=2,
                                                           local_shuffle_buffer_size=512, local_shuffle_seed=1),
        "keel_chunks": lambda: shard_batches(shard, BATCH, row_bytes=row_bytes, drop_last=True, shuffle_rows=512,
                                             seed=1, prefetch_batches=2),
        "whole_blocks": lambda: slice_batches(shard.iter_torch_batches(batch_size=None, prefetch_batches=1), BATCH, drop_last=True),
    }


def read_loop(config: dict) -> None:
    import ray
    import ray.train

    shard, clock = ray.train.get_dataset_shard("train"), config["clock"]
    rates: list[dict[str, float]] = []
    rows_read: dict[str, int] = {}
    epoch = 0
    for _ in range(config["rounds"]):
        rates.append({})
        for name, batches in stages(shard, config["row_bytes"]).items():
            per_epoch = []
            for _ in range(config["epochs"]):
                ray.get(clock.set.remote(epoch))  # as the loop does: a fresh augmentation seed per epoch
                epoch += 1
                start, rows = time.perf_counter(), 0
                for batch in batches():
                    rows += len(batch["y"])
                per_epoch.append(rows / (time.perf_counter() - start))
            rates[-1][name], rows_read[name] = median(per_epoch), rows
    if ray.train.get_context().get_world_rank() == 0:
        Path(config["out"]).write_text(json.dumps({"rates": rates, "rows_read": rows_read}))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=12_000)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per stage per round (median taken)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from benchmarks.overhead import job
    from orchestrator.data.batches import row_bytes
    from orchestrator.data.generators import make_synthetic

    workdir = tempfile.mkdtemp(prefix="keel-data-path-")
    make_synthetic(workdir, rows=args.rows, shape=(1, 8, 8))
    spec = job(workdir, args.epochs, BATCH)
    plan, clock, train = keel_train_pipeline(spec)
    out = Path(workdir) / "rates.json"
    TorchTrainer(read_loop, train_loop_config={"clock": clock, "rounds": args.rounds, "epochs": args.epochs,
                                               "row_bytes": row_bytes(spec.data), "out": str(out)},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": plan.cpus_per_worker}),
                 run_config=RunConfig(name=f"data-path-{time.time_ns()}", storage_path=f"{workdir}/runs"),
                 datasets={"train": train}).fit()
    measured = json.loads(out.read_text())
    rounds = measured["rates"]
    names = list(rounds[0])
    result = {"rows": args.rows, "batch": BATCH, "rounds": rounds, "rows_read_by_rank_0": measured["rows_read"],
              "median": {n: median([r[n] for r in rounds]) for n in names},
              "vs_torch_b32_shuf": {n: median([r[n] / r["torch_b32_shuf"] for r in rounds]) for n in names}}
    print(f"\ndata path: rows/s per worker, 2 Ray Train workers, batch {BATCH}, {args.rows} rows of 1x8x8, "
          f"{args.rounds} interleaved rounds ({machine()})\n")
    print(table(["stage", "rows/s (median)", "min-max", "vs torch_b32_shuf"],
                [[n, f"{result['median'][n]:.0f}", f"{min(r[n] for r in rounds):.0f}-{max(r[n] for r in rounds):.0f}",
                  f"{result['vs_torch_b32_shuf'][n]:.2f}"] for n in names]))
    print(f"wrote {save('data_path', result)}")
    return result


if __name__ == "__main__":
    main()
