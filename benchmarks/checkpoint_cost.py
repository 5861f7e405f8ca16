"""Checkpoint integrity cost at scale: save and resume of a synthetic state of about 1 GB, with and without
the manifest's checksums. Variants interleave round by round (noise hits all alike); medians and ranges.

  save             torch.save of the state (what any checkpoint costs)
  checksum_1thread the manifest's checksum of the saved file in one thread (as Keel did before)
  checksum         the same, 64 MB pieces hashed in parallel threads, as save_checkpoint computes it
  load             torch.load of the file (what any resume costs)
  verify           verify_checkpoint: the checksum again, at resume, before loading

    python -m benchmarks.checkpoint_cost [--gb 1.0] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine, median, save, table
from orchestrator.train.checkpointing import MANIFEST_FILE, STATE_FILE, file_digest, verify_checkpoint


def synthetic_state(gb: float) -> dict:
    """Tensors of 16 MB (4M float32), like a large model's layers; random, so nothing compresses."""
    per = 4 * 1024 * 1024
    g = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(per, generator=g) for i in range(max(1, int(gb * 1e9 / (per * 4))))}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    state = synthetic_state(args.gb)
    times: dict[str, list[float]] = {k: [] for k in ("save", "checksum_1thread", "checksum", "load", "verify")}
    with tempfile.TemporaryDirectory(prefix="keel-ckpt-cost-") as tmp:
        directory = Path(tmp)
        path = directory / STATE_FILE
        for _ in range(args.rounds):
            start = time.perf_counter()
            torch.save(state, path)
            times["save"].append(time.perf_counter() - start)
            start = time.perf_counter()
            file_digest(path, workers=1)
            times["checksum_1thread"].append(time.perf_counter() - start)
            start = time.perf_counter()
            digest = file_digest(path)
            times["checksum"].append(time.perf_counter() - start)
            (directory / MANIFEST_FILE).write_text(json.dumps({STATE_FILE: {"bytes": path.stat().st_size, **digest}}))
            start = time.perf_counter()
            verify_checkpoint(directory)
            times["verify"].append(time.perf_counter() - start)
            start = time.perf_counter()
            torch.load(path, weights_only=True)
            times["load"].append(time.perf_counter() - start)
        size = path.stat().st_size
    med = {k: median(v) for k, v in times.items()}
    ratios = {"checksum_1thread_over_save": [c / s for c, s in zip(times["checksum_1thread"], times["save"])],
              "checksum_over_save": [c / s for c, s in zip(times["checksum"], times["save"])],
              "verify_over_load": [v / lo for v, lo in zip(times["verify"], times["load"])]}
    rows = [[k, f"{med[k]:.2f}", f"{min(v):.2f}-{max(v):.2f}"] for k, v in times.items()]
    rows += [[k.replace("_", " "), f"{median(v):.0%}", f"{min(v):.0%}-{max(v):.0%}"] for k, v in ratios.items()]
    print(f"checkpoint integrity cost, {size / 1e9:.2f} GB state, {args.rounds} rounds ({machine()})\n")
    print(table(["", "median s / ratio", "range"], rows))
    result = {"bytes": size, "rounds": args.rounds, "seconds": times, "median_s": med,
              "ratios": {k: {"median": median(v), "min": min(v), "max": max(v)} for k, v in ratios.items()}}
    print(f"\nwrote {save('checkpoint_cost', result)}")
    return result


if __name__ == "__main__":
    main()
