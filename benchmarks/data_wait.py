"""Data-wait fraction: share of each epoch a worker spends waiting for its next batch, on the synthetic
3x32x32 ResNet job with 2 workers (augmentation in Ray Data tasks). The first epoch includes the
pipeline's start-up and is reported separately. Target: < 5% after the first epoch.

    python -m benchmarks.data_wait [--rows N] [--epochs E]
"""

from __future__ import annotations

import argparse
import tempfile

from benchmarks.common import machine, save, table
from orchestrator.data.generators import make_synthetic
from orchestrator.spec import load_spec
from orchestrator.train.driver import run_job


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--channels", default="[16,32,64]")
    args = parser.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="keel-wait-")
    make_synthetic(workdir, rows=args.rows, shape=(3, 32, 32))
    spec = load_spec("jobs/synthetic-resnet.yaml", [
        f"data.train={workdir}/train.parquet", f"data.val={workdir}/val.parquet", f"run.storage_path={workdir}/runs",
        f"run.epochs={args.epochs}", f"model.channels={args.channels}"])
    outcome = run_job(spec)
    result = {"rows": args.rows, **summarize(outcome.history), "status": outcome.status}
    print(f"data wait, synthetic 3x32x32 ResNet {args.channels}, 2 workers ({machine()})\n")
    print(table(["epoch", "data wait", "samples/s"],
                [[e["epoch"] + 1, f"{e['data_wait_frac']:.1%}", f"{e['samples_per_s']:.0f}"] for e in result["epochs"]]))
    print(f"\nworst after epoch 1: **{result['steady_data_wait_frac']:.1%}** (target < 5%)\nwrote {save('data_wait', result)}")
    return result


def summarize(history: list[dict]) -> dict:
    """Per-epoch wait and rate from a run's history; the worst after the first epoch (the pipeline's start-up)."""
    steady = [h["data_wait_frac"] for h in history[1:]] or [history[0]["data_wait_frac"]]
    return {"epochs": [{"epoch": h["epoch"], "data_wait_frac": h["data_wait_frac"], "samples_per_s": h["samples_per_s"]}
                       for h in history],
            "steady_data_wait_frac": max(steady), "target": 0.05}


if __name__ == "__main__":
    main()
