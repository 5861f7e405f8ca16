"""The driver: start (or join) Ray, build a TorchTrainer, fit, summarise.

All checks that can fail on bad input run in `preflight` (train/planning.py), before Ray starts or
a run directory is written, so a typo costs a second and leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from orchestrator import metric_keys as mk
from orchestrator.numbers import finite
from orchestrator.ray_session import borrow_run_channel, ensure_ray, follow_channel, give_back_run_channel
from orchestrator.spec import JobSpec
from orchestrator.storage import discard_download, download_run, filesystem, is_remote, join, upload_dir
from orchestrator.train.in_process import newest_checkpoint, runs_in_process
from orchestrator.train.planning import Plan, preflight, resolved, wait_for_resources
from orchestrator.train.run_lock import run_directory_lock


@dataclass
class RunOutcome:
    status: str                      # finished | early_stopped | diverged | failed
    run_dir: Path                    # on object storage: the mirror of its small files (gone once run() returns)
    history: list[dict] = field(default_factory=list)
    checkpoint: Optional[str] = None
    reason: str = ""
    stability: Optional[dict] = None  # the run's stability report, when diagnostics are on
    warnings: list[str] = field(default_factory=list)
    placement: list[dict] = field(default_factory=list)  # per rank: node id, host, pid (placement.json)
    run_uri: Optional[str] = None    # the run directory on object storage, if it is there
    drift: Optional[dict] = None     # fine-tuning: the new data against the checkpoint's (drift.json)

    @property
    def ok(self) -> bool:
        return self.status in ("finished", "early_stopped")

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}

    def best(self, metric: str = mk.VAL_ACCURACY, mode: str = "max") -> Optional[float]:
        values = [h[metric] for h in self.history if finite(h.get(metric))]
        return (max if mode == "max" else min)(values) if values else None


def trainer_class():
    """Ray Train's TorchTrainer; on an embedded local Ray, without its placement-group cleaner. The cleaner is
    a detached actor per run that frees the run's placement group if the controller dies while the cluster
    lives on; an embedded cluster ends with this process, and the cleaner is one more process start per run
    (measured: ~3 CPU-s of a 31 CPU-s one-epoch fit on 2 cores). Clusters keep it."""
    from ray.train.torch import TorchTrainer

    from orchestrator.ray_session import in_embedded_ray

    if not in_embedded_ray():
        return TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class EmbeddedTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks() if not isinstance(c, PlacementGroupCleanerCallback)]

    return EmbeddedTorchTrainer


def storage_of(spec: JobSpec) -> Optional[dict]:
    """{fs, storage_path, run_path} when the run lives on object storage, else None. The resolved filesystem
    (endpoint included) travels to Ray Train and the workers."""
    if not is_remote(spec.run.storage_path):
        return None
    fs, storage_path = filesystem(spec.run.storage_path)
    return {"fs": fs, "storage_path": storage_path, "run_path": join(storage_path, spec.run.name)}


# Ray starts every worker process at niceness 15 (RAY_worker_niceness), below its own nice-0 processes. A
# training worker preempted by any of them stalls its peers at the next collective: measured on 2 cores
# (benchmarks.overhead, 3 interleaved rounds, benchmarks/RESULTS.md), Keel with per-worker BN ran at 0.72 of
# torchrun's DDP (0.70-0.75) at niceness 15 and at 0.80 (0.77-0.88) at 0, as torchrun's processes run. Ray's
# own job supervisor sets 0 for itself. A RAY_worker_niceness the user set in the environment is kept.
def training_worker_env() -> dict:
    return {"env_vars": {"RAY_worker_niceness": os.environ.get("RAY_worker_niceness", "0")}}


def build_trainer(spec: JobSpec, plan: Plan, progress: Any = None, clock: Any = None, callbacks: list = (),
                  initial_checkpoint: Optional[dict] = None, in_process: bool = False, forward: Any = None):
    """in_process: Ray Train's local mode, the loop runs in this process (train/in_process.py); `forward`:
    there, the channel that takes each report to a sweep trial's thread (a worker group uses `callbacks`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from orchestrator.data.pipeline import build_datasets

    from orchestrator.train.loop import train_loop_per_worker
    from orchestrator.train.worker_config import WorkerConfig

    storage = storage_of(spec)
    storage_fs, storage_path = (storage["fs"], storage["storage_path"]) if storage else (None, spec.run.storage_path)
    datasets = build_datasets(spec, plan, clock)
    train = {"train": datasets.pop("train")}  # only the training split streams through Ray Train
    s, resources = spec.scaling, {"CPU": plan.cpus_per_worker}
    if spec.scaling.use_gpu:
        resources["GPU"] = 1
    return trainer_class()(
        train_loop_per_worker,
        train_loop_config=WorkerConfig(spec, plan.epoch_rows, progress, clock, plan.preprocess.to_dict(),
                                       initial_checkpoint, storage, plan.data_reference, datasets,
                                       in_process, forward).as_loop_config(),
        scaling_config=ScalingConfig(num_workers=0 if in_process else (s.min_workers, s.max_workers) if s.elastic else s.min_workers,
                                     use_gpu=s.use_gpu, resources_per_worker=resources, placement_strategy=s.placement_strategy,
                                     elastic_resize_monitor_interval_s=s.resize_check_s),
        run_config=RunConfig(name=spec.run.name, storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=spec.run.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=spec.run.keep_checkpoints),
                             callbacks=list(callbacks), worker_runtime_env=training_worker_env()),
        torch_config=TorchConfig(backend="nccl" if spec.scaling.use_gpu else "gloo",
                                 timeout_s=spec.scaling.collective_timeout_s),
        datasets=train,
    )


# How each backend reports a peer that stopped answering: gloo "Timed out waiting 10000ms for recv" or
# "Application timeout caused pair closure" (seen in CI), nccl "Watchdog caught collective operation timeout".
HUNG_PEER = re.compile(r"timed out|timeout caused pair closure|collective operation timeout", re.IGNORECASE)
UNUSED_PARAMETER = re.compile(r"did not receive grad|Expected to have finished reduction in the prior iteration")
EXCEPTION_LINE = re.compile(r"^\s*[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b[^:]*: ")


def failure_reason(exc: Exception, spec: JobSpec) -> str:
    text = str(exc)
    if HUNG_PEER.search(text):
        return (f"a peer stopped responding: a collective timed out after {spec.scaling.collective_timeout_s} s "
                "(scaling.collective_timeout_s); see the worker logs for the rank that hung")
    if UNUSED_PARAMETER.search(text):  # DDP's message is pages long, and Ray keeps only its tail
        which = re.search(r"did not receive grad for rank (\d+): ([\d ]+)", text)
        where = f" (parameter indices {which.group(2).strip()} on rank {which.group(1)})" if which else ""
        return (f"DDP: a parameter got no gradient in a step{where}: set scaling.find_unused_parameters: true if some "
                "are used on some batches only, or make every parameter take part in the loss")
    lines = [line for line in text.strip().splitlines() if line.strip()]
    raised = [line for line in lines if EXCEPTION_LINE.match(line)]  # the error itself, not a hint after it
    return ((raised or lines)[-1].strip() if lines else type(exc).__name__)[:500]


def already_trained(spec: JobSpec) -> Optional[tuple[Path, int]]:
    """(its newest checkpoint, the epochs it holds) for a run on a local disk whose newest checkpoint is intact
    and holds run.epochs epochs or more; None otherwise (on object storage the workers find out as they
    resume). The epoch is read from the mapped file; only a finished run's checkpoint is hashed here."""
    from orchestrator.train.checkpointing import list_checkpoints, mapped_payload
    from orchestrator.train.resume import newest_good_index

    if is_remote(spec.run.storage_path):
        return None
    checkpoints = list_checkpoints(Path(spec.run.storage_path) / spec.run.name)
    if not checkpoints:
        return None
    try:
        epochs = mapped_payload(checkpoints[-1])["epoch"] + 1
    except Exception:  # damaged: resume falls back to an older one, in the run
        return None
    if epochs < spec.run.epochs or newest_good_index(checkpoints[-1:], warn=lambda message: None) is None:
        return None
    return checkpoints[-1], epochs


def nothing_to_train(spec: JobSpec, plan: Plan, checkpoint: Path, epochs: int, on_event) -> RunOutcome:
    """The outcome of a finished run, read back from its directory: its metrics and stability report."""
    from orchestrator.train.changed_settings import changed_settings, read_written_with
    from orchestrator.train.run_files import read_metrics, read_stability

    run_dir = Path(spec.run.storage_path) / spec.run.name
    on_event({"type": "start", "plan": plan, "run_dir": str(run_dir)})
    changed = changed_settings(read_written_with(checkpoint), spec)
    on_event({"type": "resumed", "epoch": epochs, "checkpoint": str(checkpoint), "changed": changed})
    outcome = RunOutcome(status="finished", run_dir=run_dir, history=read_metrics(run_dir), checkpoint=str(checkpoint),
                         stability=read_stability(run_dir))
    if outcome.final.get(mk.STOP_REASON):
        outcome.status = "diverged" if outcome.final.get(mk.DIVERGED) else "early_stopped"
        outcome.reason = outcome.final[mk.STOP_REASON]
    return outcome


# Ray Data's read/augment tasks (0.5 CPU each) need CPUs that the workers do not hold: measured, a 2-CPU
# head whose 2 workers took 1 CPU each ran no data task and the job showed nothing for 14 minutes.
def run_job(spec: JobSpec, on_event: Callable[[dict], None] = lambda e: None, verbose: bool = False,
            dashboard: bool = True, plan: Optional[Plan] = None) -> RunOutcome:
    """Run a job to the end. `on_event` receives live progress dicts (step / epoch / resumed). `plan`: the
    caller's own preflight of this spec (keel run checks before any side effect), so it is not repeated."""
    if plan is None or plan.train_rows < 0:  # none yet, or the data is still to be generated
        plan = preflight(spec)
    spec = resolved(spec)
    local_dir = None if is_remote(spec.run.storage_path) else Path(spec.run.storage_path) / spec.run.name
    with run_directory_lock(local_dir) as claim:  # a second keel run of this run.name stops here (train/run_lock.py)
        trained = already_trained(spec)
        if trained is not None:  # a re-run of a finished run: say so in a second, without starting Ray
            return nothing_to_train(spec, plan, *trained, on_event)
        return train(spec, plan, on_event, verbose, dashboard, claim)


def train(spec: JobSpec, plan: Plan, on_event: Callable[[dict], None], verbose: bool, dashboard: bool,
          claim: Callable[[], None]) -> RunOutcome:
    """run_job's training; `claim()` makes the run directory this process's once Ray is up."""
    in_process = runs_in_process(spec)
    ensure_ray(spec.scaling.address, verbose, dashboard, prestart_workers=not in_process)
    claim()
    from ray.train import TrainingFailedError

    from orchestrator.train.run_files import MetricsLog

    run_uri = join(spec.run.storage_path, spec.run.name) if is_remote(spec.run.storage_path) else None
    run_dir = download_run(run_uri, missing_ok=True) if run_uri else Path(spec.run.storage_path) / spec.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(spec.to_yaml())
    log = MetricsLog(run_dir)
    outcome = RunOutcome(status="finished", run_dir=run_dir, run_uri=run_uri, drift=plan.drift)
    if plan.drift is not None:
        (run_dir / "drift.json").write_text(json.dumps(plan.drift, indent=1))

    def publish() -> None:  # object storage: the mirror's small files up to the run directory there
        if run_uri:
            upload_dir(run_dir, run_uri)
    channel = borrow_run_channel()  # rank 0's events to this driver, and the data pipeline's epoch clock
    done = threading.Event()

    def handle(event: dict) -> None:  # live view + metrics files
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

    # the driver's only thread besides fit()
    pumper = threading.Thread(target=follow_channel, args=(channel, done.is_set, handle, 0.1), daemon=True)
    pumper.start()
    try:
        on_event({"type": "start", "plan": plan, "run_dir": run_uri or str(run_dir)})
        wait_for_resources(spec, plan)
        result = build_trainer(spec, plan, channel, channel, in_process=in_process).fit()
        outcome.checkpoint = result.checkpoint.path if result.checkpoint else None
    except TrainingFailedError as exc:
        outcome.status, outcome.reason = "failed", failure_reason(exc, spec)
    except Exception as exc:  # in process, the loop's own error arrives as itself
        if not in_process:
            raise
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
        if run_uri and not pumper.is_alive():  # the mirror's files are all in the bucket now
            discard_download(run_dir)
        give_back_run_channel(channel, reusable=not pumper.is_alive())
    if in_process:  # local mode's result holds the last report's checkpoint; Ray Train's, the newest stored
        newest = newest_checkpoint(spec, storage_of(spec))
        outcome.checkpoint = newest.path if newest else None
    reason = outcome.final.get(mk.STOP_REASON, "")
    if outcome.status != "failed" and reason:
        outcome.status = "diverged" if outcome.final.get(mk.DIVERGED) else "early_stopped"
        outcome.reason = reason
    return outcome
