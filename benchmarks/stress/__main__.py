"""The stress suite as a benchmark: `python -m benchmarks.stress [--scenarios a,b] [--epochs N]`.

Runs `keel stress` (every scenario under the plain and the keel profile, one Ray session), prints the
markdown table and writes benchmarks/results/stress.json (+ the table and the loss-curve PNG beside it).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from benchmarks.common import DEFAULT_RESULTS, save
from orchestrator.stress.runner import run_stress
from orchestrator.stress.scenarios import BY_NAME


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenarios", default=",".join(BY_NAME))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lstm-epochs", type=int, default=4)
    parser.add_argument("--transformer-epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    out = Path(os.environ.get("KEEL_BENCH_RESULTS", DEFAULT_RESULTS)) / "stress"
    summary = run_stress(out, args.scenarios.split(","), {"digits": args.epochs, "lstm": args.lstm_epochs, "transformer": args.transformer_epochs}, seeds=args.seeds,
                         on_run=lambda r: print(f"{r.scenario} {r.profile}: acc {r.accuracy} diverged {r.diverged} ({r.seconds} s)", flush=True))
    print((out / "stress.md").read_text())
    print(f"loss curves: {out / 'stress_losses.png'}")
    save("stress", summary)


if __name__ == "__main__":
    main()
