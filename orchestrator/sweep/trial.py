"""One sweep trial: a Tune function trainable that fits a Keel TorchTrainer (the Train V2 pattern).

Each epoch's `ray.train.report` reaches Tune as one result *with its checkpoint*: a Train callback
forwards (metrics, persisted checkpoint path) to this trial's thread, which calls `tune.report`.
(Ray's TuneReportCallback forwards only the path, as a metric, so PBT would have nothing to clone.)
A one-worker CPU trial trains in this process instead (Ray Train's local mode, train/in_process.py): there
the loop itself stores each checkpoint and forwards the same item on the same channel.

A trial restored by Tune (an interrupted sweep resumed, or PBT's exploit) starts a fresh Train run
from `tune.get_checkpoint()`; under PBT it keeps its own, mutated hyper-parameters.
"""

from __future__ import annotations

import copy
import math
import threading
import time
from typing import Optional

from ray.train.v2.api.callback import UserCallback

from orchestrator import metric_keys as mk
from orchestrator.numbers import finite
from orchestrator.spec_text import set_dotted
from orchestrator.storage import exists, join
from orchestrator.sweep.spec import SweepSpec
from orchestrator.sweep.stopping import divergence_reason

# Under PBT a diverged trial is not stopped: it reports this score so PBT's exploit replaces it with a
# clone of a top trial (PBT skips NaN scores, and a stopped trial can no longer be exploited).
WORST = {"max": -1e9, "min": 1e9}
TRIAL_CPU = 0.05  # the trial's own driver process; Tune refuses 0
IDLE_REPORT_S = (1.0, 5.0)  # a diverged PBT trial whose run ended reports at its own epoch pace, within these bounds


def trial_job(config: dict, base_tree: dict, sweep: SweepSpec, run_name: str, trials_dir: str) -> dict:
    tree = copy.deepcopy(base_tree)
    for path, value in config.items():
        set_dotted(tree, path, value)
    r = sweep.resources
    set_dotted(tree, "run.name", run_name)
    set_dotted(tree, "run.storage_path", trials_dir)
    set_dotted(tree, "scaling.num_workers", r.workers_per_trial)
    set_dotted(tree, "scaling.cpus_per_worker", r.cpus_per_worker)
    set_dotted(tree, "scaling.use_gpu", r.gpus_per_worker > 0)
    if sweep.scheduler.kind == "pbt":
        set_dotted(tree, "run.checkpoint_every", 1)  # PBT clones from the latest report's checkpoint
    return tree


def loss_threshold(sweep: SweepSpec, num_classes: int) -> Optional[float]:
    """`auto`: ten times a uniform guess's loss (a first report can already be the explosion)."""
    value = sweep.divergence.loss_threshold
    return 10 * math.log(num_classes) if value == "auto" else value


class ForwardReports(UserCallback):
    """Runs in the Train controller: hands each report and its persisted checkpoint to the trial thread."""

    def __init__(self, channel):
        self.channel = channel

    def after_report(self, run_context, metrics, checkpoint):
        import ray

        # the checkpoint as stored (path and filesystem): on object storage its path alone names no file
        stored = (checkpoint.path, checkpoint.filesystem) if checkpoint else None
        ray.get(self.channel.put.remote({"metrics": dict(metrics[0]), "checkpoint": stored}))


def trains_in_process(sweep: SweepSpec, job) -> bool:
    """A one-worker CPU trial trains in the trial's own process (Ray Train's local mode, train/in_process.py):
    no worker group to start per trial, or per PBT clone. The trial then holds the worker's CPUs itself."""
    from orchestrator.train.in_process import one_cpu_worker

    r = sweep.resources  # the trial's job as trial_job will set it; a trial runs wherever Tune placed it
    return one_cpu_worker(r.workers_per_trial, r.gpus_per_worker > 0, job.run.max_failures)


def trial_resources(sweep: SweepSpec, base_job) -> dict:
    """What Tune reserves for a trial's own process: little when it drives a worker group (the workers hold
    theirs), the worker's CPUs when it trains itself."""
    return {"cpu": TRIAL_CPU + (sweep.resources.cpus_per_worker if trains_in_process(sweep, base_job) else 0)}


def restored_run_name(trial_id: str, trials_dir: str) -> str:
    """A fresh Train run name per restore: the trial's own run directory may hold a later (or, after a
    PBT clone, an unrelated) checkpoint that Ray Train would otherwise resume by itself."""
    k = 1
    while exists(join(trials_dir, f"{trial_id}-r{k}")):
        k += 1
    return f"{trial_id}-r{k}"


def source_trial(checkpoint) -> str:
    """The trial whose run wrote a checkpoint (from its config.yaml's run.name), on any storage."""
    import yaml

    with checkpoint.filesystem.open_input_stream(join(checkpoint.path, "config.yaml")) as f:
        name = yaml.safe_load(f.read().decode())["run"]["name"]
    return name.split("-r")[0]


def fingerprint_of(checkpoint) -> str:
    """The weight fingerprint of a checkpoint's model, read from its own file (any storage)."""
    from orchestrator.train.checkpointing import read_payload, state_fingerprint

    with checkpoint.as_directory() as directory:
        return state_fingerprint(read_payload(directory)["model"])


# Searched fields that leave the data scan as it is (rows, checks, preprocessing statistics, epoch pools):
# a trial that searches only these, and fields outside data., reuses the base job's scan.
SCAN_FREE = ("data.batch_size", "data.shuffle_buffer", "data.prefetch_batches", "data.augment.")


def reuses_scan(config: dict) -> bool:
    def free(path: str) -> bool:
        if path == "data.augment.soft_labels":  # changes the preprocessing fitted on the labels
            return False
        return not path.startswith("data.") or any(path == f or (f.endswith(".") and path.startswith(f)) for f in SCAN_FREE)
    return "run.epochs" not in config and all(free(path) for path in config)


def run_trial(config: dict, base_tree: dict, sweep_json: dict, trials_dir: str, base_plan=None) -> None:
    from ray import tune

    from orchestrator.ray_session import follow_channel, open_run_channel
    from orchestrator.spec import JobSpec
    from orchestrator.train.driver import build_trainer
    from orchestrator.train.planning import preflight, resolved

    sweep = SweepSpec.model_validate(sweep_json)
    trial_id, restored, pbt = tune.get_context().get_trial_id(), tune.get_checkpoint(), sweep.scheduler.kind == "pbt"
    run_name = restored_run_name(trial_id, trials_dir) if restored else trial_id
    spec = resolved(JobSpec.model_validate(trial_job(config, base_tree, sweep, run_name, trials_dir)))
    initial, cloned_from = None, None
    if restored is not None:  # Tune's copy of the checkpoint: a local directory or one on object storage
        initial = {"path": restored.path, "filesystem": restored.filesystem, "keep_hyperparameters": pbt}
        cloned_from = source_trial(restored)
        cloned_from = cloned_from if cloned_from != trial_id else None
    channel = open_run_channel()  # this trial's own process is its driver: reports, and the epoch clock
    plan = preflight(spec, same_data=base_plan if base_plan is not None and reuses_scan(config) else None)
    in_process = trains_in_process(sweep, spec)  # then the loop forwards its reports itself
    trainer = build_trainer(spec, plan, None, channel, callbacks=[] if in_process else [ForwardReports(channel)],
                            initial_checkpoint=initial, in_process=in_process, forward=channel if in_process else None)
    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # re-raised in the trial thread: the trial errors, as Tune expects
            failure.append(exc)

    fitting = threading.Thread(target=fit, daemon=True)
    fitting.start()
    first_loss, threshold, last, report_times = None, loss_threshold(sweep, spec.data.num_classes), {}, []

    def on_report(item: dict) -> None:  # soon after it is made: Ray Train rotates old checkpoints away
        nonlocal first_loss, last
        last = metrics = item["metrics"]
        if cloned_from:
            metrics["cloned_from"] = cloned_from
        if restored is not None and metrics.get(mk.RESUMED_FROM):  # what the workers loaded vs the donor's file
            metrics["clone_loaded_donor_weights"] = int(metrics[mk.RESUMED_FROM]["fingerprint"] == fingerprint_of(restored))
        if pbt:  # keep a diverged trial alive at the worst score; the stopper only records it
            reason = divergence_reason(metrics, first_loss, metric=sweep.metric, loss_metric=sweep.divergence.loss_metric,
                                       loss_factor=sweep.divergence.loss_factor, loss_threshold=threshold)
            if reason:
                metrics.update({sweep.metric: WORST[sweep.mode], mk.DIVERGED: 1, mk.STOP_REASON: reason})
        loss = metrics.get(sweep.divergence.loss_metric)
        if first_loss is None and finite(loss):
            first_loss = loss
        checkpoint = tune.Checkpoint(*item["checkpoint"]) if item["checkpoint"] else None
        tune.report(for_tune(metrics), checkpoint=checkpoint)
        report_times.append(time.monotonic())

    follow_channel(channel, lambda: not fitting.is_alive(), on_report, 0.05)
    fitting.join()
    if failure:
        raise failure[0]
    if pbt and last.get(mk.DIVERGED):
        pace = (report_times[-1] - report_times[0]) / (len(report_times) - 1) if len(report_times) > 1 else 0.0
        wait_to_be_replaced(last, min(max(pace, IDLE_REPORT_S[0]), IDLE_REPORT_S[1]))


def for_tune(metrics: dict) -> dict:
    """An epoch's metrics as Tune takes them: the guard events as a count (Tune's loggers take numbers, not
    lists; the events themselves stay in the trial's own run directory, metrics.jsonl). The count is the run's
    so far, from the guards' cumulative counters: the epoch's event list holds only its last 20, so a trial that
    skipped steps early and ran clean after showed no events at all. A gradient-norm jump the clip let through
    is no guard event (nothing was done; a converged trial's table note said "2 guard events" for two of them)."""
    acted = sum(int(metrics.get(key) or 0) for key in mk.ACTED_COUNTERS)
    return {**{k: v for k, v in metrics.items() if k != mk.EVENTS}, mk.GUARD_EVENTS: acted}


def wait_to_be_replaced(last: dict, every_s: float) -> None:
    """A PBT trial whose run stopped as diverged (Keel's guards) reports its worst score at about its own
    epoch pace until PBT's exploit replaces it with a clone of a top trial, or the scheduler stops it
    (LastReportKeptPBT: once no other healthy trial is left to clone). PBT clones only from a trial still running
    that ranked above it at a report (PBT keeps its checkpoint then). Bounded by its run's epochs, a trial that
    diverged in its first steps was done before a healthy one had reported at all."""
    from ray import tune

    while True:
        time.sleep(every_s)
        tune.report({**for_tune(last), mk.WAITING_FOR_CLONE: 1})
