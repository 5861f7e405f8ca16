"""`keel check JOB.yaml`: prove on this machine that a job is distributed-correct, before a cluster.

On the embedded local Ray, for k steps of the job's own model, optimizer, schedule, guards and data
(its Parquet through its preprocessing and augmentation, the first k global batches, read once in the
driver so that every run sees them in the same order), it runs 1 worker x N*b (in this process, Ray Train's
local mode) and N workers x b (Ray Train workers) and
compares what synchronized training promises to keep equal: every layer's output on the first batch,
the loss and global grad norm at every step, the parameters and buffers after k steps, the replicas
across ranks at every step; then that the same run twice is identical and that stopping at k/2 and
resuming from a Keel checkpoint continues exactly. See compare.py for the tolerances.

The check runs on CPU (gloo) with the job's N = scaling.num_workers (at least 2), fractional CPUs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from orchestrator.check.compare import CheckLine, CheckReport, compare
from orchestrator.errors import BadInput
from orchestrator.spec import JobSpec

__all__ = ["run_check", "check_table", "CheckReport", "CheckLine"]


def check_spec(spec: JobSpec) -> JobSpec:
    """The job as the check runs it: locally, on CPU, without injected faults."""
    spec = spec.model_copy(deep=True)
    spec.scaling.address, spec.scaling.use_gpu = None, False
    if spec.scaling.amp == "fp16":
        spec.scaling.amp = "none"  # fp16 needs a GPU; its loss scaling is per-run, not a sync question
    spec.scaling.num_workers = max(2, spec.scaling.max_workers)
    spec.faults = []
    return spec


def first_batches(spec: JobSpec, plan, rows: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """The job's first `rows` training rows of epoch 0, through its real Ray Data pipeline, read twice."""
    import ray.data

    from orchestrator.data.pipeline import build_datasets
    from orchestrator.data.preprocess import FEATURES, LABEL
    from orchestrator.ray_session import borrow_run_channel, give_back_run_channel

    options, channel = ray.data.DataContext.get_current().execution_options, borrow_run_channel()
    ordered, options.preserve_order = options.preserve_order, True  # for these reads only, not later runs
    try:
        train = build_datasets(spec, plan, channel)["train"]  # the random per-epoch stage re-runs per read
        reads = []
        for _ in range(2):
            batch = train.take_batch(min(rows, plan.train_rows), batch_format="numpy")
            reads.append((batch[FEATURES], batch[LABEL]))
    finally:
        options.preserve_order = ordered
        give_back_run_channel(channel)
    (x, y), (x2, y2) = reads
    same = x.shape == x2.shape and np.array_equal(x, x2) and np.array_equal(y, y2)
    if len(x) < rows:  # a small dataset: the check goes round it again (the same rows, the same order)
        index = np.resize(np.arange(len(x)), rows)
        x, y = x[index], y[index]
    return np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(y), same


def random_states(states: tuple | None = None) -> tuple:
    """Python's, numpy's and torch's global generator states; with `states`, put those back."""
    import random

    import torch

    if states is not None:
        random.setstate(states[0]), np.random.set_state(states[1]), torch.set_rng_state(states[2])
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def fit(spec: JobSpec, workers: int, cpus: float, config: dict, out: Path) -> dict[str, list[dict]]:
    """`check_loop` on `workers` Ray Train workers; with 0, Ray Train's local mode runs it once in this process
    (the 1-worker reference needs no process group, and a Ray Train run costs ~12 s of process start-up here)."""
    import torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from orchestrator.check.worker import check_loop
    from orchestrator.train.driver import trainer_class

    out.mkdir(parents=True)
    threads, rng = torch.get_num_threads(), random_states()
    if not workers:  # as in a Ray worker given `cpus` CPUs: one intra-op thread per whole CPU, at least one
        torch.set_num_threads(max(1, int(cpus)))
    try:
        trainer_class()(check_loop, train_loop_config={**config, "out": str(out)},
                        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": cpus}),
                        run_config=RunConfig(name=f"keel-check-{workers}", storage_path=str(out / "ray")),
                        torch_config=TorchConfig(backend="gloo", timeout_s=spec.scaling.collective_timeout_s)).fit()
    finally:  # this process as it was: the check reseeds the global generators as the loop does
        torch.set_num_threads(threads)
        random_states(rng)
    results: dict[str, list[dict]] = {}
    for tag in ("run", "repeat", "resume"):
        files = sorted(out.glob(f"{tag}-rank*.pt"), key=lambda p: int(p.stem.rsplit("rank", 1)[1]))
        if files:
            results[tag] = [torch.load(f, weights_only=False) for f in files]
    return results


def run_check(spec: JobSpec, steps: int = 20, say: Callable[[str], None] = lambda message: None) -> CheckReport:
    from orchestrator.ray_session import ensure_ray
    from orchestrator.train.planning import preflight, resolved

    if steps < 2 or steps % 2:
        raise BadInput(f"--steps: {steps}; needs an even number >= 2 (the resume check stops half-way)")
    spec = resolved(check_spec(spec))
    plan = preflight(spec, resumes=False)  # its runs have names of their own
    workers, batch = spec.scaling.num_workers, spec.data.batch_size
    ensure_ray(None, dashboard=False)
    say(f"reading the first {steps} global batches ({workers} x {batch}) through the job's pipeline, twice")
    x, y, same = first_batches(spec, plan, steps * workers * batch)
    config = {"spec": spec.model_dump(mode="json"), "steps": steps, "steps_per_epoch": max(plan.steps_per_epoch),
              "x": x, "y": y}
    with tempfile.TemporaryDirectory(prefix="keel-check-") as tmp:
        say(f"1 worker x {workers * batch}: {steps} steps")
        one = fit(spec, 0, plan.cpus_per_worker, config, Path(tmp) / "one")  # in this process
        say(f"{workers} workers x {batch}: {steps} steps, the same again, and a resume at step {steps // 2}")
        many = fit(spec, workers, plan.cpus_per_worker, config, Path(tmp) / "many")
    report = compare(one["run"][0], many, same)
    dropped = one["run"][0]["dropout_layers"]
    if dropped:
        report.notes.append(f"dropout off in {dropped} layer(s) for the check: its masks are drawn per rank")
    return report


def check_table(report: CheckReport):
    from rich.table import Table

    table = Table(title="keel check")
    for column in ("check", "result", "detail"):
        table.add_column(column)
    for line in report.lines:
        table.add_row(line.name, "[green]match[/green]" if line.ok else "[red]MISMATCH[/red]", line.detail)
    return table
