"""Where a run's CPU goes, process by process: warm 1-epoch fits of the main job in one Ray session, with
every process's CPU time sampled from /proc (Linux) and summed by its Ray title (ray::TrainController,
ray::RayTrainWorker, ...). On a 2-core machine a short run is CPU-bound, so every actor process that a run
starts (each imports Ray, some Ray Train and torch) is on its critical path.

    python -m benchmarks.run_processes [--fits N]
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import threading
import time
from collections import Counter

from benchmarks.common import machine, median, save, table

TICKS = os.sysconf("SC_CLK_TCK")


def read_processes() -> dict[tuple[str, str], tuple[float, str]]:
    """{(pid, start time): (CPU seconds so far, name)} for every process now alive."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline") as f:
                cmd = f.read().replace("\0", " ").strip()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        out[(pid, fields[19])] = ((int(fields[11]) + int(fields[12])) / TICKS, cmd or stat[stat.find("(") + 1:stat.rfind(")")])
    return out


def process_kind(name: str) -> str:
    """A Ray process's title without the method it runs (ray::TrainController), else the program's file name."""
    if name.startswith("ray::"):
        return re.split(r"[.( ]", name, maxsplit=1)[0]
    return os.path.basename(name.split()[0]) if name else "?"


def is_actor(name: str) -> bool:
    return name.startswith("ray::") and not name.startswith("ray::IDLE")


class CpuByProcess:
    """Samples every process's CPU time in a thread, so that processes that end between marks still count."""

    def __init__(self, interval_s: float = 0.2):
        self.seen: dict[tuple[str, str], tuple[float, str]] = {}
        self.interval_s, self.lock = interval_s, threading.Lock()
        threading.Thread(target=self.loop, daemon=True).start()

    def loop(self) -> None:
        while True:
            self.mark()
            time.sleep(self.interval_s)

    def mark(self) -> dict:
        now = read_processes()
        with self.lock:
            for key, (cpu, name) in now.items():
                old = self.seen.get(key)  # an actor's title changes with the method it runs: keep the first
                self.seen[key] = (cpu, old[1] if old and is_actor(old[1]) else name)
            return dict(self.seen)


def cpu_between(before: dict, after: dict) -> tuple[Counter, Counter]:
    """CPU seconds per process kind between two marks, and how many processes of each kind were new."""
    cpu, new = Counter(), Counter()
    for key, (seconds, name) in after.items():
        used = seconds - before.get(key, (0.0, name))[0]
        if used > 0.01:
            cpu[process_kind(name)] += used
            new[process_kind(name)] += key not in before
    return cpu, new


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fits", type=int, default=3, help="warm fits measured (after one that warms the session)")
    args = parser.parse_args(argv)
    from orchestrator.data.generators import make_digits
    from orchestrator.ray_session import ensure_ray
    from orchestrator.spec import load_spec
    from orchestrator.train.driver import run_job

    workdir = tempfile.mkdtemp(prefix="keel-processes-")
    make_digits(workdir)
    sampler = CpuByProcess()
    ensure_ray(None, dashboard=False)
    fits = []
    for i in range(args.fits + 1):
        spec = load_spec("jobs/digits-resnet.yaml", [f"run.storage_path={workdir}/runs", f"run.name=fit-{i}", "run.epochs=1",
                                                     f"data.train={workdir}/train.parquet", f"data.val={workdir}/val.parquet"])
        before, start = sampler.mark(), time.monotonic()
        run_job(spec, dashboard=False)
        wall = time.monotonic() - start
        time.sleep(1)  # the run's processes exit
        cpu, new = cpu_between(before, sampler.mark())
        if i:  # the first fit also starts the session's own actors
            fits.append({"wall_s": wall, "cpu_s": sum(cpu.values()), "by_kind": dict(cpu), "new": dict(new)})
    kinds = sorted({k for f in fits for k in f["by_kind"]}, key=lambda k: -median([f["by_kind"].get(k, 0) for f in fits]))
    rows = [[k, f"{median([f['by_kind'].get(k, 0.0) for f in fits]):.1f}", median([f["new"].get(k, 0) for f in fits])]
            for k in kinds if median([f["by_kind"].get(k, 0.0) for f in fits]) >= 0.2]
    print(f"warm 1-epoch fits of the main job, median of {args.fits} ({machine()}): "
          f"{median([f['wall_s'] for f in fits]):.1f} s, {median([f['cpu_s'] for f in fits]):.1f} CPU-s\n")
    print(table(["process", "CPU-s per fit", "new per fit"], rows))
    result = {"fits": fits}
    print(f"wrote {save('run_processes', result)}")
    return result


if __name__ == "__main__":
    main()
