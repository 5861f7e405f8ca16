"""The sweep spec: a base job plus a search block, validated like job specs (one-line errors, exit 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, model_validator

from orchestrator import metric_keys as mk
from orchestrator.errors import BadInput
from orchestrator.spec import JobSpec, Section, apply_overrides, doc, parse_spec, read_yaml

DISTRIBUTIONS = {"loguniform": 2, "uniform": 2, "quniform": 3, "choice": None, "randint": 2, "grid": None}


class SchedulerSpec(Section):
    kind: Literal["fifo", "asha", "hyperband", "median", "pbt"] = doc("asha", "Trial scheduler; divergence stopping composes with each.")
    max_t: int = doc(10, "asha/hyperband: the most reports (epochs) a trial may run.", ge=1)
    grace_period: int = doc(1, "asha/median: reports before a trial may be stopped for being slow.", ge=1)
    reduction_factor: float = doc(3.0, "asha/hyperband: keep 1/reduction_factor of trials at each rung.", gt=1)
    perturbation_interval: int = doc(2, "pbt: reports between exploit/explore steps.", ge=1)
    quantile_fraction: float = doc(0.25, "pbt: bottom fraction that clones a top trial.", gt=0, le=0.5)


class DivergenceSpec(Section):
    enabled: bool = doc(True, "Stop diverging trials at once (non-finite metric, exploding loss, Keel's own diverged signal).")
    loss_metric: str = doc(mk.TRAIN_LOSS, "Loss reported by trials, watched for explosion.")
    loss_factor: float = doc(10.0, "Stop when the loss exceeds this many times its first reported value.", gt=1)
    loss_threshold: Union[float, Literal["auto"], None] = doc(
        "auto", "Stop when the loss exceeds this value; auto = 10 x ln(num_classes), ten times a uniform guess's loss.")


class ResourcesSpec(Section):
    workers_per_trial: int = doc(1, "Data-parallel workers in each trial; 1 (CPU): the trial's own process trains (Ray Train's local mode) and holds the worker's CPUs.", ge=1)
    cpus_per_worker: float = doc(0.5, "CPUs per worker (fractional leaves room for Ray Data locally).", gt=0)
    gpus_per_worker: float = doc(0.0, "GPUs per worker (> 0 trains on GPUs).", ge=0)


class SweepSpec(Section):
    name: str = doc(..., "Experiment name; re-running the same name resumes it.", pattern=r"^[A-Za-z0-9_.-]+$")
    storage_path: str = doc("runs", "Where the experiment directory goes: a local directory, or s3://bucket/prefix (endpoint and keys the standard AWS way, e.g. AWS_ENDPOINT_URL).")
    base: Union[str, dict] = doc(..., "The job to sweep: a path to a job YAML (relative to this file) or the job inline.")
    overrides: list[str] = doc([], "dotted.key=value overrides applied to the base job first.")
    search: dict[str, dict[str, Any]] = doc(..., "dotted.field: {distribution: args}; loguniform/uniform [lo, hi], quniform [lo, hi, q], randint [lo, hi], choice/grid [values].")
    metric: str = doc(mk.VAL_ACCURACY, "Metric to optimise (a key of the epoch reports).")
    mode: Literal["min", "max"] = doc("max", "Whether lower or higher is better.")
    num_samples: int = doc(4, "Samples of the search space (times every grid combination).", ge=1)
    scheduler: SchedulerSpec = doc(SchedulerSpec(), "Trial scheduler.")
    divergence: DivergenceSpec = doc(DivergenceSpec(), "Divergence-aware stopping.")
    max_concurrent_trials: int = doc(1, "Trials running at once.", ge=1)
    time_budget_s: Optional[float] = doc(None, "Stop the whole sweep after this many seconds.", gt=0)
    resources: ResourcesSpec = doc(ResourcesSpec(), "Resources per trial.")
    loggers: list[Literal["mlflow", "wandb"]] = doc([], "Also log trials to MLflow / Weights & Biases through Ray's logger callbacks (pip install keel[mlflow] / keel[wandb]).")

    @model_validator(mode="after")
    def _search(self) -> "SweepSpec":
        for path, dist in self.search.items():
            if len(dist) != 1:
                raise ValueError(f"search.{path}: one distribution per field, e.g. {{loguniform: [1e-4, 1e-1]}}")
            (kind, args), = dist.items()
            if kind not in DISTRIBUTIONS:
                raise ValueError(f"search.{path}: unknown distribution {kind!r} (use {', '.join(DISTRIBUTIONS)})")
            if not isinstance(args, list) or not args:
                raise ValueError(f"search.{path}.{kind}: expected a list of arguments")
            want = DISTRIBUTIONS[kind]
            if want is not None:
                args = dist[kind] = [_number(a) for a in args]  # YAML 1.1 reads 1e-3 (no dot) as a string
                if len(args) != want or not all(isinstance(a, (int, float)) for a in args):
                    raise ValueError(f"search.{path}.{kind}: expected {want} numbers, got {args}")
                if args[0] >= args[1]:
                    raise ValueError(f"search.{path}.{kind}: lower bound {args[0]} must be below upper bound {args[1]}")
                if kind == "loguniform" and args[0] <= 0:
                    raise ValueError(f"search.{path}.loguniform: bounds must be positive, got {args}")
            check_field_path(path)
        return self


def _number(value):
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def check_field_path(path: str) -> None:
    """A dotted path must name a leaf field of the job spec."""
    model: Any = JobSpec
    parts = path.split(".")
    for i, part in enumerate(parts):
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            raise ValueError(f"search.{path}: {'.'.join(parts[:i + 1])} is not a job spec field")
        annotation = fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    if model is not None:
        raise ValueError(f"search.{path}: is a section, not a field")


def load_sweep(path: str | Path, overrides: list[str] = ()) -> tuple[SweepSpec, dict]:
    """(sweep spec, resolved base job tree). The base job must itself be valid."""
    path = Path(path)
    sweep = parse_spec(apply_overrides(read_yaml(path), list(overrides), SweepSpec), str(path), SweepSpec)
    if isinstance(sweep.base, str):
        base_path = (path.parent / sweep.base) if not Path(sweep.base).is_absolute() else Path(sweep.base)
        if not base_path.is_file():
            base_path = Path(sweep.base)  # relative to the working directory, as a fallback
        base_tree, source = read_yaml(base_path), str(base_path)
    else:
        base_tree, source = dict(sweep.base), f"{path}: base"
    base_tree = absolute_paths(apply_overrides(base_tree, list(sweep.overrides)))
    parse_spec(base_tree, source)  # BadInput if the base job is invalid
    check_search_values(sweep, base_tree, str(path))
    return sweep, base_tree


def check_search_values(sweep: SweepSpec, base_tree: dict, source: str) -> None:
    """Every value the search can give makes a valid job (a range's bounds, each listed value): an lr drawn
    from uniform [-1, 1] would otherwise start trials that fail one by one."""
    import copy

    from pydantic import ValidationError

    from orchestrator.spec_text import set_dotted

    for path, dist in sweep.search.items():
        (kind, args), = dist.items()
        values = args if DISTRIBUTIONS[kind] is None else [args[0], args[1] - 1 if kind == "randint" else args[1]]
        for value in values:
            try:
                JobSpec.model_validate(set_dotted(copy.deepcopy(base_tree), path, value))
            except ValidationError as exc:
                raise BadInput(f"{source}: search.{path}.{kind}: {value!r} is not a valid {path}: "
                               f"{exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None


LOCAL_FILE_FIELDS = ("data.train", "data.val", "data.curriculum.checkpoint", "init_from.checkpoint")


def absolute_paths(tree: dict) -> dict:
    """The job's local files made absolute against this working directory, as `keel run` reads them: a trial
    runs in a process whose working directory is not necessarily the user's."""
    from orchestrator.data.sources import resolve

    for dotted in LOCAL_FILE_FIELDS:
        *sections, key = dotted.split(".")
        node = tree
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(key), str):
            node[key] = resolve(node[key])
    extra = (tree.get("data") or {}).get("extra_val")
    if isinstance(extra, dict):
        tree["data"]["extra_val"] = {name: resolve(path) if isinstance(path, str) else path for name, path in extra.items()}
    return tree


def is_sweep_tree(tree: dict) -> bool:
    """A sweep names its base job or a search space; a job spec has neither key, so a sweep missing one of
    them is still read as a sweep (and told what it lacks) rather than as a job lacking data and run."""
    return "search" in tree or "base" in tree


def is_sweep_file(path: str | Path) -> bool:
    try:
        tree = read_yaml(path)
    except BadInput:
        return False
    return is_sweep_tree(tree)
