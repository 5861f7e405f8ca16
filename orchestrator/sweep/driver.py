"""`keel sweep`: Ray Tune over Keel jobs. Each trial (sweep/trial.py) is a function trainable that fits a
TorchTrainer (the Train V2 pattern); every epoch report becomes one Tune result with its checkpoint."""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import yaml

from ray.tune import Callback
from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler

from orchestrator import metric_keys as mk
from orchestrator.data.sources import resolve
from orchestrator.numbers import finite
from orchestrator.storage import filesystem, is_remote, join, read_text, write_text
from orchestrator.sweep.spec import SweepSpec
from orchestrator.spec_text import set_dotted
from orchestrator.sweep.trial import loss_threshold, run_trial, trial_resources

DIVERGED_FILE = "keel_diverged.json"


def param_space(search: dict) -> dict:
    from ray import tune

    makers = {"loguniform": tune.loguniform, "uniform": tune.uniform, "quniform": tune.quniform,
              "randint": tune.randint, "choice": lambda *v: tune.choice(list(v)), "grid": lambda *v: tune.grid_search(list(v))}
    return {path: makers[kind](*args) for path, dist in search.items() for kind, args in dist.items()}


def logger_callbacks(sweep: SweepSpec) -> list:
    """Ray's own MLflow / W&B logger callbacks, imported only when asked for."""
    from orchestrator.errors import BadInput

    callbacks = []
    for name in sweep.loggers:
        try:
            if name == "mlflow":
                import mlflow  # noqa: F401
                from ray.air.integrations.mlflow import MLflowLoggerCallback
                callbacks.append(MLflowLoggerCallback(experiment_name=sweep.name))
            else:
                import wandb  # noqa: F401
                from ray.air.integrations.wandb import WandbLoggerCallback
                callbacks.append(WandbLoggerCallback(project=sweep.name))
        except ImportError:
            raise BadInput(f"loggers: {name} is not installed (pip install 'keel[{name}]')") from None
    return callbacks


def make_scheduler(sweep: SweepSpec, epochs: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler, MedianStoppingRule

    s = sweep.scheduler
    # A STOP at a trial's very last report races the TorchTrainer's own shutdown and leaked its workers'
    # placement group (measured on Ray 2.60: the next trial then waited forever for CPUs). A trial that
    # reaches max_t == epochs ends by itself anyway, so let it.
    max_t = s.max_t + 1 if s.max_t == epochs else s.max_t
    if s.kind == "asha":
        return ASHAScheduler(max_t=max_t, grace_period=s.grace_period, reduction_factor=s.reduction_factor)
    if s.kind == "hyperband":
        return HyperBandScheduler(max_t=max_t, reduction_factor=s.reduction_factor)
    # Every interval in the sweep spec counts reports (epochs). Tune's median rule and PBT count seconds
    # (time_total_s) unless told otherwise: PBT with perturbation_interval 1 then perturbed once a second, and
    # with epochs shorter than that a diverged trial was never cloned (its good donor saved no checkpoint
    # while ranked above it before it finished; seen on a 2-trial sweep with 0.5 s epochs).
    if s.kind == "median":
        return MedianStoppingRule(time_attr="training_iteration", grace_period=s.grace_period)
    if s.kind == "pbt":
        numeric = {k: v for k, v in param_space(sweep.search).items() if not isinstance(v, dict)}
        return LastReportKeptPBT(epochs, time_attr="training_iteration", perturbation_interval=s.perturbation_interval,
                                 quantile_fraction=s.quantile_fraction, hyperparam_mutations=numeric)
    return FIFOScheduler()


class LastReportKeptPBT(PopulationBasedTraining):
    """PBT that leaves a healthy trial alone at its last report. Stock PBT perturbs there too: a trial in the
    lower quantile is paused and cloned, a whole new Ray Train run that then only finds itself done (seen: a
    PBT sweep's clone cloned a second time at its final epoch, 128 s instead of 72). It ends by itself. A
    diverged trial is still PBT's to replace: it reports on, waiting (sweep/trial.py), until a clone replaces
    it or no healthy trial is left unfinished, when this stops it."""

    def __init__(self, epochs: int, **kwargs):
        super().__init__(**kwargs)
        self.epochs = epochs
        self.diverged: set[str] = set()  # trials whose latest report was a diverged one: no donors

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        (self.diverged.add if result.get(mk.DIVERGED) == 1 else self.diverged.discard)(trial.trial_id)
        last = result.get("training_iteration", 0) >= trial.config.get("run.epochs", self.epochs)
        if last and result.get(mk.DIVERGED) != 1:
            return TrialScheduler.CONTINUE
        decision = super().on_trial_result(tune_controller, trial, result)
        if result.get(mk.WAITING_FOR_CLONE) and decision == TrialScheduler.CONTINUE and not self.donor_may_come(tune_controller, trial):
            return TrialScheduler.STOP  # its run ended diverged and no trial left could replace it
        return decision

    def _quantiles(self):
        """Stock PBT's quantiles, with no diverged trial as a donor: two diverged trials tie at the worst
        score, and stock PBT cloned one from the other's diverged checkpoint."""
        lower, upper = super()._quantiles()
        upper = [t for t in upper if t.trial_id not in self.diverged]
        return (lower, upper) if upper else ([], [])

    def donor_may_come(self, tune_controller, waiting) -> bool:
        """Whether a trial other than `waiting` is unfinished and not diverged itself: a clone may yet come."""
        return any(t is not waiting and not t.is_finished() and t.trial_id not in self.diverged for t in tune_controller.get_trials())


@dataclass
class TrialRow:
    trial_id: str
    status: str            # RUNNING / TERMINATED / ERROR / diverged
    config: dict
    metric: Optional[float]
    iterations: int
    reason: str = ""
    events: int = 0

    @classmethod
    def of(cls, trial, result: dict, metric: str, record: Optional[dict], tune_status: str) -> "TrialRow":
        """A Tune trial and its latest result, as the live table and a re-read experiment both show it."""
        status, reason = trial_status(record, tune_status)
        return cls(trial.trial_id, status, dict(trial.config), result.get(metric), result.get("training_iteration", 0),
                   reason, result.get(mk.GUARD_EVENTS, 0))


@dataclass
class SweepOutcome:
    exp_dir: str | Path    # a local directory, or a URI on object storage
    rows: list[TrialRow] = field(default_factory=list)
    best: Optional[TrialRow] = None
    best_job: Optional[Path] = None
    unstarted: int = 0     # planned trials Tune had not yet created when the sweep ended (Ctrl-C)
    reported: set[str] = field(default_factory=set)  # the metrics the trials' last results hold

    @property
    def unfinished(self) -> int:
        """Trials a re-run would still run: those interrupted and those never started."""
        return self.unstarted + sum(r.status in ("PENDING", "RUNNING", "PAUSED") for r in self.rows)


def planned_trials(sweep: SweepSpec) -> int:
    """How many trials the sweep makes: num_samples times every combination of the grids (Tune's rule)."""
    return sweep.num_samples * math.prod(len(args) for dist in sweep.search.values() for kind, args in dist.items() if kind == "grid")


def experiment_dir(sweep: SweepSpec) -> str | Path:
    """Where Tune keeps the experiment: a local directory, or s3://bucket/prefix/<name> (sweep.storage_path)."""
    if is_remote(sweep.storage_path):
        return join(sweep.storage_path, sweep.name)
    return Path(resolve(sweep.storage_path)) / sweep.name


def tune_storage(exp_dir: str | Path) -> tuple[str, object]:
    """(path, pyarrow filesystem or None) of an experiment directory, as Tune's storage arguments take them."""
    if is_remote(str(exp_dir)):
        fs, path = filesystem(str(exp_dir), "storage_path")
        return path, fs
    return str(Path(exp_dir).absolute()), None  # pyarrow reads a relative path as a URI without a scheme


def run_sweep(sweep: SweepSpec, base_tree: dict, on_result: Callable[[list[TrialRow]], None] = lambda rows: None,
              base_spec=None, base_plan=None) -> SweepOutcome:
    """base_spec / base_plan: the base job as the CLI already parsed and checked it (its data scanned once:
    trials reuse the scan unless they search fields that change it)."""
    from ray import tune

    from orchestrator.sweep.stopping import DivergenceStopper
    from orchestrator.ray_session import ensure_ray

    ensure_ray(base_tree.get("scaling", {}).get("address"))
    exp_dir = experiment_dir(sweep)
    path, fs = tune_storage(exp_dir)
    write_text(join(str(exp_dir), "keel_sweep.yaml"), yaml.safe_dump(sweep.model_dump(mode="json"), sort_keys=False))
    divergence = sweep.divergence.model_copy()
    divergence.loss_threshold = loss_threshold(sweep, base_tree["data"]["num_classes"])
    # PBT: diverged trials are recorded, not stopped; they report the worst score and PBT clones over them
    stopper = DivergenceStopper(divergence, sweep.metric, join(str(exp_dir), DIVERGED_FILE), stop=sweep.scheduler.kind != "pbt")
    from orchestrator.spec import JobSpec

    base_spec = base_spec or JobSpec.model_validate(base_tree)
    trainable = tune.with_parameters(run_trial, base_tree=base_tree, sweep_json=sweep.model_dump(mode="json"),
                                     trials_dir=join(str(exp_dir), "trials"), base_plan=base_plan)
    trainable = tune.with_resources(trainable, trial_resources(sweep, base_spec))
    LIVE_HANDLERS[sweep.name] = on_result
    if tune.Tuner.can_restore(path, storage_filesystem=fs):  # an interrupted sweep: resume it
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, restart_errored=False, storage_filesystem=fs)
    else:
        tuner = tune.Tuner(trainable, param_space=param_space(sweep.search), tune_config=tune.TuneConfig(
            metric=sweep.metric, mode=sweep.mode, num_samples=sweep.num_samples, scheduler=make_scheduler(sweep, base_spec.run.epochs),
            max_concurrent_trials=sweep.max_concurrent_trials, time_budget_s=sweep.time_budget_s),
            run_config=tune.RunConfig(name=sweep.name, storage_path=path.rsplit("/", 1)[0], storage_filesystem=fs, stop=stopper,
                                      callbacks=[LiveRows(sweep.name, stopper, sweep.metric), *logger_callbacks(sweep)],
                                      verbose=0))
    started = time.monotonic()
    # Tune's default output prints, whatever the verbosity, where its staging copy and TensorBoard files lie in
    # Ray's session directory under /tmp: not where the experiment is kept. Keel prints its own table and the
    # experiment's place; Tune's legacy reporter at verbose=0 prints nothing.
    saved = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        with warnings.catch_warnings():  # Tune's advice to PBT users to reuse actors: not something a Keel user can act on
            warnings.filterwarnings("ignore", message="Consider boosting PBT performance", category=UserWarning)
            tuner.fit()
    finally:
        if saved is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = saved
    outcome = summarize(exp_dir, sweep.metric, sweep.mode, base_tree)
    # Tune creates a grid's trials as it goes: after a Ctrl-C the experiment may hold fewer trials than planned,
    # all finished, and yet be unfinished. A spent time budget is an end, not an interruption.
    budget_spent = sweep.time_budget_s is not None and time.monotonic() - started >= sweep.time_budget_s
    outcome.unstarted = 0 if budget_spent else max(0, planned_trials(sweep) - len(outcome.rows))
    return outcome


def local_copy(name: str, text: str) -> Path:
    """The best job of a sweep on object storage, as a local file `keel run` takes."""
    import tempfile

    target = Path(tempfile.mkdtemp(prefix="keel-sweep-")) / f"{name}-best_job.yaml"
    target.write_text(text)
    return target


# Live-table handlers by experiment name: Tune pickles its callbacks, a rich display must stay out of them.
LIVE_HANDLERS: dict[str, Callable[[list[TrialRow]], None]] = {}


class LiveRows(Callback):
    """A Tune callback on the driver: one row per trial for the live table (diverged marked with the reason)."""

    def __init__(self, key: str, stopper, metric: str):
        self.key, self.stopper, self.metric = key, stopper, metric
        self.rows: dict[str, TrialRow] = {}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._update(trial, result)

    def on_trial_complete(self, iteration, trials, trial, **info):  # called before Tune marks it TERMINATED
        self._update(trial, trial.last_result or {}, status="TERMINATED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._update(trial, trial.last_result or {}, status="ERROR")

    def _update(self, trial, result, status=None):
        self.rows[trial.trial_id] = TrialRow.of(trial, result, self.metric, self.stopper.reasons.get(trial.trial_id),
                                                status or trial.status)
        LIVE_HANDLERS.get(self.key, lambda rows: None)(list(self.rows.values()))


def trial_status(record: Optional[dict], tune_status: str) -> tuple[str, str]:
    """(status, reason): `diverged` unless PBT has since replaced the trial with a clone of a good one."""
    if not record:
        return tune_status, ""
    if record.get("cloned_from"):
        return tune_status, (f"diverged at report {record['iteration']} ({record['reason']}); "
                             f"replaced by a clone of {record['cloned_from']}")
    return "diverged", record["reason"]


def summarize(exp_dir: str | Path, metric: str, mode: str, base_tree: Optional[dict] = None) -> SweepOutcome:
    """Re-read an experiment directory, local or on object storage (finished or interrupted): rows, the best
    healthy trial, and (given the base job) the best config as a job YAML, written beside the experiment
    and, for an experiment on object storage, also to a local file that `keel run` takes."""
    import json

    from ray import tune

    from orchestrator.errors import BadInput

    path, fs = tune_storage(exp_dir)
    if not tune.Tuner.can_restore(path, storage_filesystem=fs):
        raise BadInput(f"{exp_dir}: not a Keel sweep experiment directory")
    analysis = tune.ExperimentAnalysis(path, storage_filesystem=fs)  # reads the experiment state; needs no trainable
    reasons = json.loads(read_text(join(str(exp_dir), DIVERGED_FILE)) or "{}")
    outcome = SweepOutcome(exp_dir)
    for trial in analysis.trials:
        outcome.rows.append(TrialRow.of(trial, trial.last_result or {}, metric, reasons.get(trial.trial_id), trial.status))
        outcome.reported |= {k for k, v in (trial.last_result or {}).items() if isinstance(v, (int, float))}
    healthy = [r for r in outcome.rows if r.status == "TERMINATED" and finite(r.metric)]
    if healthy:
        outcome.best = (max if mode == "max" else min)(healthy, key=lambda r: r.metric)
        if base_tree is not None:
            best_tree = copy.deepcopy(base_tree)
            for field_path, value in outcome.best.config.items():
                set_dotted(best_tree, field_path, value)
            name = str(exp_dir).rstrip("/").rsplit("/", 1)[-1]
            set_dotted(best_tree, "run.name", f"{name}-best")
            text = yaml.safe_dump(best_tree, sort_keys=False)
            write_text(join(str(exp_dir), "best_job.yaml"), text)
            outcome.best_job = Path(join(str(exp_dir), "best_job.yaml")) if fs is None else local_copy(name, text)
    outcome.rows.sort(key=lambda r: (r.status != "TERMINATED", -(r.metric or -math.inf) if mode == "max" else (r.metric or math.inf)))
    return outcome
