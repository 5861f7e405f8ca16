"""The driver: check everything, start (or join) Ray, build a TorchTrainer, fit, summarise.

All checks that can fail on bad input run in `preflight`, before Ray starts or
a run directory is written, so a typo costs a second and leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from orchestrator.data.curriculum import pool_sizes
from orchestrator.data.curriculum import thresholds as curriculum_thresholds
from orchestrator.data.generators import GENERATORS
from orchestrator.data.preprocess import PreprocessState, fit_preprocess
from orchestrator.data.scan import scan_split
from orchestrator.data.sources import resolve
from orchestrator.errors import BadInput
from orchestrator.ray_session import beside_the_driver, ensure_ray
from orchestrator.train.worker_config import steps_for
from orchestrator.spec import JobSpec
from orchestrator.storage import check_storage, download_run, filesystem, is_remote, join, upload_dir



@dataclass
class Plan:
    train_rows: int
    val_rows: int
    steps_per_epoch: list[int]          # per epoch: the curriculum pool grows
    cpus_per_worker: float
    preprocess: Optional[PreprocessState] = None
    curriculum_limits: Optional[list[float]] = None
    dropped_rows: dict = field(default_factory=dict)  # split -> rows dropped (data.on_bad_rows: drop)
    epoch_rows: list[int] = field(default_factory=list)  # training rows per epoch: steps follow the actual world size


@dataclass
class RunOutcome:
    status: str                      # finished | early_stopped | diverged | failed
    run_dir: Path                    # on object storage: the local mirror of the run's small files
    history: list[dict] = field(default_factory=list)
    checkpoint: Optional[str] = None
    reason: str = ""
    stability: Optional[dict] = None  # the run's stability report, when diagnostics are on
    warnings: list[str] = field(default_factory=list)
    placement: list[dict] = field(default_factory=list)  # per rank: node id, host, pid (placement.json)
    run_uri: Optional[str] = None    # the run directory on object storage, if it is there

    @property
    def ok(self) -> bool:
        return self.status in ("finished", "early_stopped")

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}

    def best(self, metric: str = "val_accuracy", mode: str = "max") -> Optional[float]:
        values = [h[metric] for h in self.history if isinstance(h.get(metric), (int, float))]
        return (max if mode == "max" else min)(values) if values else None


def check_rows(scan, data, field_name: str) -> int:
    """Refuse (or count, with on_bad_rows: drop) rows with NaN/Inf features or labels out of range."""
    imputed = data.preprocess.impute != "none"
    for column in data.feature_columns:
        if scan.nan[column] and not imputed and data.on_bad_rows == "error":
            raise BadInput(f"{scan.path}: column {column!r} has {scan.nan[column]} rows with NaN features "
                           "(set data.preprocess.impute, or data.on_bad_rows: drop)")
        if scan.inf[column] and data.on_bad_rows == "error":
            raise BadInput(f"{scan.path}: column {column!r} has {scan.inf[column]} rows with infinite features "
                           "(fix the data, or set data.on_bad_rows: drop)")
    if scan.bad_label_rows and data.on_bad_rows == "error":
        raise BadInput(f"{scan.path}: column {data.label!r} has {scan.bad_label_rows} labels outside "
                       f"[0, {data.num_classes}) (range seen {scan.label_min}..{scan.label_max})")
    if data.on_bad_rows == "error":
        return 0
    return scan.bad_rows_imputed if imputed else scan.bad_rows


def preflight(spec: JobSpec, generate: bool = True, same_data: Optional[Plan] = None) -> Plan:
    """Every check that needs no cluster: data present and well-formed, resources possible.
    With generate=False (keel validate) a missing dataset that `data.generate` would write is fine.
    same_data: a plan already made for this very data (a sweep's base job, for a trial whose searched
    fields leave the scan alone): its scan is reused, the rest is checked for this spec."""
    data, scaling = spec.data, spec.scaling
    if is_remote(spec.run.storage_path):
        check_storage(spec.run.storage_path)  # the URI, the endpoint, the bucket: before any worker starts
    if spec.model.kind == "custom":  # the user's module: imported, built and run once here, before Ray starts
        from orchestrator.models import build_model
        from orchestrator.models.custom import check_custom_model

        check_custom_model(build_model(spec.model, data), spec.model.factory, data.shape, data.num_classes)
    local = scaling.address is None
    cpus = os.cpu_count() or 1
    if local and scaling.min_workers > cpus:
        raise BadInput(f"scaling.num_workers: {scaling.num_workers} workers but this machine has {cpus} CPUs "
                       "(lower it, or set scaling.address to run on a cluster)")
    if local and scaling.use_gpu:
        import torch
        if torch.cuda.device_count() < scaling.min_workers:
            raise BadInput(f"scaling.use_gpu: {scaling.num_workers} GPU workers but this machine has "
                           f"{torch.cuda.device_count()} GPUs")
    cpus_per_worker = fit_cpus_per_worker(spec, cpus) if local else (scaling.cpus_per_worker or 1.0)  # a cluster: fitted later
    if cpus_per_worker is None:
        raise BadInput(f"scaling.cpus_per_worker: {scaling.min_workers} workers x {scaling.cpus_per_worker or MIN_CPUS_PER_WORKER:g} "
                       f"CPUs leave less than {DATA_RESERVE_CPUS:g} of this machine's {cpus} CPUs for Ray Data's tasks "
                       "(the run would wait for data forever); lower it or the workers")
    scanned = same_data if same_data is not None else scan_data(spec, generate)
    if scanned is None:  # keel validate: the data is still to be generated
        return Plan(-1, -1, [0] * spec.run.epochs, cpus_per_worker)
    pools, usable = scanned.epoch_rows, scanned.train_rows - scanned.dropped_rows.get("train", 0)
    steps = steps_for(pools, scaling.min_workers, data.batch_size)
    if steps_for(pools, scaling.max_workers, data.batch_size)[-1] == 0:
        raise BadInput(f"data.batch_size: {data.batch_size} x {scaling.max_workers} workers is more than the "
                       f"{usable} usable training rows in {data.train}")
    if min(steps_for(pools, scaling.max_workers, data.batch_size)) == 0:
        raise BadInput(f"data.curriculum.start_fraction: the first epochs' pool is smaller than one global batch "
                       f"({data.batch_size} x {scaling.max_workers})")
    return replace(scanned, steps_per_epoch=steps, cpus_per_worker=cpus_per_worker)


def scan_data(spec: JobSpec, generate: bool) -> Optional[Plan]:
    """The data part of a plan: both splits scanned and checked, preprocessing fitted on the training split,
    the training rows of every epoch (the curriculum pool grows). None: missing, and not to be generated now."""
    data = spec.data
    missing = data.generate and not Path(data.train).exists() and not Path(data.val).exists()
    if missing and not generate:
        return None
    if missing:
        GENERATORS[data.generate](Path(data.train).parent)
    cur = data.curriculum
    extra = [cur.score] if cur.enabled and not cur.checkpoint else []
    scorer = None
    if cur.enabled and cur.checkpoint:
        from functools import partial

        from orchestrator.data.scoring import checkpoint_losses, load_scorer
        load_scorer(resolve(cur.checkpoint))  # BadInput now if it is not a checkpoint
        scorer = partial(checkpoint_losses, resolve(cur.checkpoint))
    scans = {split: scan_split(resolve(getattr(data, split)), f"data.{split}", data.feature_columns, data.label,
                               data.num_classes, data.shape, extra_columns=extra if split == "train" else [],
                               scorer=scorer if split == "train" else None)
             for split in ("train", "val")}
    dropped = {split: check_rows(scan, data, f"data.{split}") for split, scan in scans.items()}
    preprocess = fit_preprocess(scans["train"], data.preprocess, data.shape, data.num_classes, data.on_bad_rows,
                                soft_labels=data.augment.soft_labels)
    usable = scans["train"].rows - dropped["train"]
    pools, limits = [usable] * spec.run.epochs, None
    if data.curriculum.enabled:
        scores = np.asarray(scans["train"].extra["score" if cur.checkpoint else cur.score], dtype=np.float64)
        limits = curriculum_thresholds(scores, data.curriculum, spec.run.epochs)
        pools = [min(usable, n) for n in pool_sizes(scores, limits)]
    return Plan(scans["train"].rows, scans["val"].rows, [], 0.0, preprocess, limits, dropped, pools)


def resolved(spec: JobSpec) -> JobSpec:
    """The spec with local paths made absolute: workers and read tasks run in other directories."""
    spec = spec.model_copy(deep=True)
    spec.data.train, spec.data.val = resolve(spec.data.train), resolve(spec.data.val)
    spec.run.storage_path = resolve(spec.run.storage_path)
    return spec


def build_trainer(spec: JobSpec, plan: Plan, progress_queue: Any = None, clock: Any = None, callbacks: list = (),
                  initial_checkpoint: Optional[dict] = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from orchestrator.data.pipeline import build_datasets

    from orchestrator.train.loop import train_loop_per_worker
    from orchestrator.train.worker_config import WorkerConfig

    storage_path, storage_fs, storage = spec.run.storage_path, None, None
    if is_remote(storage_path):  # the resolved filesystem (endpoint included) travels to Ray Train and the workers
        storage_fs, storage_path = filesystem(spec.run.storage_path)
        storage = {"fs": storage_fs, "run_path": join(storage_path, spec.run.name)}
    s, resources = spec.scaling, {"CPU": plan.cpus_per_worker}
    if spec.scaling.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=WorkerConfig(spec, plan.epoch_rows, progress_queue, clock, plan.preprocess.to_dict(),
                                       initial_checkpoint, storage).as_loop_config(),
        scaling_config=ScalingConfig(num_workers=(s.min_workers, s.max_workers) if s.elastic else s.min_workers,
                                     use_gpu=s.use_gpu, resources_per_worker=resources, placement_strategy=s.placement_strategy,
                                     elastic_resize_monitor_interval_s=s.resize_check_s),
        run_config=RunConfig(name=spec.run.name, storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=spec.run.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=spec.run.keep_checkpoints),
                             callbacks=list(callbacks)),
        torch_config=TorchConfig(backend="nccl" if spec.scaling.use_gpu else "gloo",
                                 timeout_s=spec.scaling.collective_timeout_s),
        datasets=build_datasets(spec, plan, clock),
    )


# How each backend reports a peer that stopped answering: gloo "Timed out waiting 10000ms for recv" or
# "Application timeout caused pair closure" (seen in CI), nccl "Watchdog caught collective operation timeout".
HUNG_PEER = re.compile(r"timed out|timeout caused pair closure|collective operation timeout", re.IGNORECASE)


def failure_reason(exc: Exception, spec: JobSpec) -> str:
    text = str(exc)
    if HUNG_PEER.search(text):
        return (f"a peer stopped responding: a collective timed out after {spec.scaling.collective_timeout_s} s "
                "(scaling.collective_timeout_s); see the worker logs for the rank that hung")
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:500]


# Ray Data's read/augment tasks (0.5 CPU each) need CPUs that the workers do not hold: measured, a 2-CPU
# head whose 2 workers took 1 CPU each ran no data task and the job showed nothing for 14 minutes.
DATA_RESERVE_CPUS = 1.0
MIN_CPUS_PER_WORKER = 0.25


def fit_cpus_per_worker(spec: JobSpec, total_cpus: float) -> Optional[float]:
    """CPUs per worker that leave DATA_RESERVE_CPUS free for the data pipeline, or None if none fit.
    An explicit scaling.cpus_per_worker is kept or refused; the default is 1, shared out when the
    cluster is smaller (N workers on a 2-CPU machine get (2 - 1) / N each)."""
    workers, wanted = spec.scaling.min_workers, spec.scaling.cpus_per_worker
    if wanted is not None:
        return wanted if workers * wanted + DATA_RESERVE_CPUS <= total_cpus + 1e-9 else None
    share = min(1.0, (total_cpus - DATA_RESERVE_CPUS) / workers)
    return share if share >= MIN_CPUS_PER_WORKER else None


def wait_for_resources(spec: JobSpec, plan: Plan) -> None:
    """Fit the workers to the cluster, leaving CPUs for Ray Data, and set plan.cpus_per_worker. On a
    cluster, ask the autoscaler for what is missing and wait (bounded: scaling.resource_wait_s); on the
    embedded local Ray nothing can be added, so a misfit fails at once. Never a run pending forever."""
    import time

    import ray

    need_gpu = spec.scaling.min_workers if spec.scaling.use_gpu else 0
    local = spec.scaling.address is None
    deadline = time.monotonic() + (0 if local else spec.scaling.resource_wait_s)
    requested = False
    while True:
        have = ray.cluster_resources()
        cpus = fit_cpus_per_worker(spec, have.get("CPU", 0))
        if cpus is not None and have.get("GPU", 0) >= need_gpu:
            plan.cpus_per_worker = cpus
            return
        if not requested and not local:  # an autoscaler adds nodes for pending demand, and nothing is pending yet
            from ray.autoscaler.sdk import request_resources

            per_worker = {"CPU": spec.scaling.cpus_per_worker or 1.0, **({"GPU": 1} if need_gpu else {})}
            # the most the run can use: an elastic run asks for its max and starts with what arrives
            request_resources(bundles=[per_worker] * spec.scaling.max_workers + [{"CPU": DATA_RESERVE_CPUS}])
            requested = True
        if time.monotonic() >= deadline:
            per = spec.scaling.cpus_per_worker or MIN_CPUS_PER_WORKER
            need_cpu = spec.scaling.min_workers * per + DATA_RESERVE_CPUS
            raise BadInput(f"scaling: {spec.scaling.min_workers} workers need {need_cpu:g} CPUs ({per:g} each"
                           f"{'' if spec.scaling.cpus_per_worker else ' at least'} + {DATA_RESERVE_CPUS:g} for Ray Data's tasks) "
                           f"and {need_gpu} GPUs but the cluster has {have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs "
                           + ("(the local machine)" if local else f"(waited {spec.scaling.resource_wait_s:g} s, scaling.resource_wait_s)"))
        time.sleep(1.0)


def run_job(spec: JobSpec, on_event: Callable[[dict], None] = lambda e: None, verbose: bool = False,
            dashboard: bool = True, plan: Optional[Plan] = None) -> RunOutcome:
    """Run a job to the end. `on_event` receives live progress dicts (step / epoch / resumed). `plan`: the
    caller's own preflight of this spec (keel run checks before any side effect), so it is not repeated."""
    if plan is None or plan.train_rows < 0:  # none yet, or the data is still to be generated
        plan = preflight(spec)
    spec = resolved(spec)
    ensure_ray(spec.scaling.address, verbose, dashboard)
    from ray.train import TrainingFailedError
    from ray.util.queue import Empty, Queue

    from orchestrator.data.pipeline import make_epoch_clock
    from orchestrator.train.run_files import MetricsLog

    run_uri = join(spec.run.storage_path, spec.run.name) if is_remote(spec.run.storage_path) else None
    run_dir = download_run(run_uri, missing_ok=True) if run_uri else Path(spec.run.storage_path) / spec.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(spec.to_yaml())
    log = MetricsLog(run_dir)
    outcome = RunOutcome(status="finished", run_dir=run_dir, run_uri=run_uri)

    def publish() -> None:  # object storage: the mirror's small files up to the run directory there
        if run_uri:
            upload_dir(run_dir, run_uri)
    queue = Queue(actor_options=beside_the_driver())
    done = threading.Event()

    def pump() -> None:  # the driver's only thread besides fit(): live view + metrics files
        while not (done.is_set() and queue.empty()):
            try:
                event = queue.get(timeout=0.2)
            except Empty:
                continue
            if event["type"] == "epoch":
                outcome.history.append(event["metrics"])
                log.append(event["metrics"])
                publish()
            elif event["type"] == "step":
                log.step(event)
            elif event["type"] == "ready":  # where each rank runs: node, host, pid
                outcome.placement = event["placement"]
                (run_dir / "placement.json").write_text(json.dumps(event["placement"], indent=1))
            elif event["type"] == "warning":
                outcome.warnings.append(event["message"])
            elif event["type"] == "stability_report":
                outcome.stability = event["report"]
                (run_dir / "stability_report.json").write_text(json.dumps(event["report"], indent=1, default=str))
            on_event(event)

    pumper = threading.Thread(target=pump, daemon=True)
    pumper.start()
    try:
        on_event({"type": "start", "plan": plan, "run_dir": run_uri or str(run_dir)})
        wait_for_resources(spec, plan)
        result = build_trainer(spec, plan, queue, make_epoch_clock()).fit()
        outcome.checkpoint = result.checkpoint.path if result.checkpoint else None
    except TrainingFailedError as exc:
        outcome.status, outcome.reason = "failed", failure_reason(exc, spec)
    except (KeyboardInterrupt, SystemExit):
        # Ctrl-C: Ray Train's own SIGINT handler aborts the controller gracefully (workers stopped,
        # checkpoints kept), then fit() raises SystemExit(1) (measured on Ray 2.60).
        outcome.status = "interrupted"
        outcome.reason = f"interrupted; re-run the same job (run.name={spec.run.name}) to resume from its last checkpoint"
    finally:
        done.set()
        pumper.join(timeout=30)
        log.close()
        publish()
        import ray
        ray.kill(queue.actor)
    reason = outcome.final.get("stop_reason", "")
    if outcome.status != "failed" and reason:
        outcome.status = "diverged" if outcome.final.get("diverged") else "early_stopped"
        outcome.reason = reason
    return outcome
