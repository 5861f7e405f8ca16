"""Start-up time of `keel run` on the smallest job, from the command to the first step and to exit.

Each round runs a fresh Python process (as a user's `keel run` would) that timestamps: imports done,
Ray started (embedded local cluster), worker group up (the workers' first message), first batch
delivered by the data pipeline, first optimizer step logged, run finished; the parent adds the exit.
Each worker count asked for runs once per round, interleaved (1 worker: Keel trains in its own process,
Ray Train's local mode, so "worker_group" is the loop's own start).

    python -m benchmarks.startup [--rounds R] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine, median, save, table

SMALLEST = ["model.kind=mlp", "model.hidden=[32]", "run.epochs=1", "run.log_every=1",
            "stability.early_stopping.enabled=false", "stability.diagnostics.enabled=false"]
PHASES = [("ray_start", "imported", "ray_started"), ("worker_group", "ray_started", "ready"),
          ("dataset_first_batch", "ready", "first_batch"), ("first_step", "first_batch", "first_step"),
          ("rest_of_run", "first_step", "finished"), ("shutdown_exit", "finished", "exit")]


def child(workdir: str, dashboard: bool, workers: int) -> None:
    marks = {"imported": 0.0}
    from orchestrator.spec import load_spec
    from orchestrator.ray_session import ensure_ray
    from orchestrator.train.driver import run_job
    marks["imported"] = time.time()
    spec = load_spec("jobs/digits-resnet.yaml", [f"data.train={workdir}/train.parquet", f"data.val={workdir}/val.parquet",
                                                 f"run.storage_path={workdir}/runs", f"run.name=startup-{time.time_ns()}", *SMALLEST,
                                                 f"scaling.num_workers={workers}"])
    from orchestrator.train.in_process import runs_in_process
    # what `keel run` does: no dashboard unless --dashboard, no idle workers prestarted for a run in process
    ensure_ray(None, dashboard=dashboard, prestart_workers=not runs_in_process(spec))
    marks["ray_started"] = time.time()

    def on_event(event: dict) -> None:
        kind = {"ready": "ready", "first_batch": "first_batch", "step": "first_step"}.get(event["type"])
        if kind and kind not in marks:
            marks[kind] = time.time()
        if event["type"] == "ready":  # trained in this process (one worker), or by a worker group
            marks["in_process"] = [p["pid"] for p in event["placement"]] == [os.getpid()]
    outcome = run_job(spec, on_event=on_event)
    marks["finished"] = time.time()
    print("MARKS " + json.dumps({**marks, "status": outcome.status}), flush=True)


def one_round(workdir: str, dashboard: bool, workers: int) -> dict:
    start = time.time()
    flags = ["--dashboard"] if dashboard else []
    proc = subprocess.run([sys.executable, "-m", "benchmarks.startup", "--child", workdir, "--workers", str(workers), *flags],
                          capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=300)
    end = time.time()
    line = next((l for l in proc.stdout.splitlines() if l.startswith("MARKS ")), None)
    if line is None:
        raise RuntimeError(f"startup child failed: {proc.stderr[-2000:]}")
    marks = {**json.loads(line[6:]), "command": start, "exit": end}
    phases = {"imports": marks["imported"] - start}
    phases.update({name: marks[b] - marks[a] for name, a, b in PHASES})
    phases["to_first_step"] = marks["first_step"] - start
    phases["to_exit"] = end - start
    return {**phases, "in_process": marks["in_process"]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child")
    parser.add_argument("--dashboard", action="store_true", help="start Ray's dashboard too (keel run --dashboard)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts, each run every round")
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.dashboard, args.workers[0])
        return {}
    from orchestrator.data.generators import make_digits

    workdir = tempfile.mkdtemp(prefix="keel-startup-")
    make_digits(workdir)
    rounds = {n: [] for n in args.workers}
    for _ in range(args.rounds):  # interleaved: 1 2 1 2 ...
        for n in args.workers:
            rounds[n].append(one_round(workdir, args.dashboard, n))
    keys = ["imports"] + [p[0] for p in PHASES] + ["to_first_step", "to_exit"]
    summary = {n: {k: median([r[k] for r in rounds[n]]) for k in keys} for n in args.workers}
    for n in args.workers:
        print(f"\nkeel run{' --dashboard' if args.dashboard else ''} start-up, smallest job (MLP [32], 1 epoch, {n} worker"
              f"{'s' if n > 1 else ', in process'}), median of {args.rounds} ({machine()})\n")
        print(table(["phase", "seconds (median)"] + [f"round {i + 1}" for i in range(args.rounds)],
                    [[k, f"{summary[n][k]:.1f}"] + [f"{r[k]:.1f}" for r in rounds[n]] for k in keys]))
        print(f"\n{n} worker(s), to first step: **{summary[n]['to_first_step']:.1f} s** (target <= 12 s, issue 17); "
              f"to exit: {summary[n]['to_exit']:.1f} s")
    smallest = min(args.workers)
    result = {"rounds": rounds[smallest], "median": summary[smallest], "by_workers": {str(n): {"rounds": rounds[n], "median": summary[n]}
              for n in args.workers}, "target_first_step_s": 12.0, "env": {k: v for k, v in os.environ.items() if k.startswith("RAY_")}}
    print(f"wrote {save('startup_dashboard' if args.dashboard else 'startup', result)}")
    return result


if __name__ == "__main__":
    main()
