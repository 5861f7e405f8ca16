"""Planning a run before Ray starts (or before its workers do): every check that can fail on bad input
(`preflight`: data present and well-formed, resources possible), the data scan it rests on, and fitting the
workers to the CPUs a machine or cluster has while one stays free for Ray Data's tasks."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np

from orchestrator.data.curriculum import pool_sizes
from orchestrator.data.curriculum import thresholds as curriculum_thresholds
from orchestrator.data.generators import GENERATORS
from orchestrator.data.preprocess import PreprocessState, fit_preprocess
from orchestrator.data.scan import scan_split
from orchestrator.data.sources import resolve
from orchestrator.errors import BadInput
from orchestrator.spec import JobSpec
from orchestrator.storage import check_storage, is_remote
from orchestrator.train.worker_config import steps_for


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
    data_reference: Optional[dict] = None  # the training split's summary, kept in checkpoints (data/drift.py)
    drift: Optional[dict] = None           # fine-tuning: the new data against the checkpoint's reference


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
    if scan.fractional_label_rows and data.on_bad_rows == "error":
        raise BadInput(f"{scan.path}: column {data.label!r} has {scan.fractional_label_rows} labels that are not whole "
                       "numbers; class labels are 0..num_classes-1 (fix the data, or set data.on_bad_rows: drop)")
    if scan.bad_label_rows and data.on_bad_rows == "error":
        raise BadInput(f"{scan.path}: column {data.label!r} has {scan.bad_label_rows} labels outside "
                       f"[0, {data.num_classes}) (range seen {scan.label_min}..{scan.label_max})")
    if data.on_bad_rows == "error":
        return 0
    return scan.bad_rows_imputed if imputed else scan.bad_rows


def preflight(spec: JobSpec, generate: bool = True, same_data: Optional[Plan] = None, resumes: bool = True) -> Plan:
    """Every check that needs no cluster: data present and well-formed, resources possible.
    With generate=False (keel validate) a missing dataset that `data.generate` would write is fine.
    same_data: a plan already made for this very data (a sweep's base job, for a trial whose searched
    fields leave the scan alone): its scan is reused, the rest is checked for this spec.
    resumes: this spec runs under its run.name, continuing that run's checkpoints (not a sweep's base job, whose
    trials have their own names, nor keel check's runs)."""
    data, scaling = spec.data, spec.scaling
    if is_remote(spec.run.storage_path):
        check_storage(spec.run.storage_path)  # the URI, the endpoint, the bucket: before any worker starts
    else:
        check_local_storage(Path(spec.run.storage_path) / spec.run.name)
    warm, model = None, None
    if spec.model.kind == "custom" or spec.init_from.checkpoint:
        from orchestrator.models import build_model

        model = build_model(spec.model, data)
        if spec.model.kind == "custom":  # the user's module: imported, built and run once here, before Ray starts
            from orchestrator.models.custom import check_custom_model

            check_custom_model(model, spec.model.factory, data.shape, data.num_classes)
        if spec.init_from.checkpoint:  # fine-tuning: the checkpoint is one and fits this model, before Ray starts
            from orchestrator.train.warm_start import check_warm_start

            warm = check_warm_start(spec, model)
    if resumes:
        check_resume_fits(spec, model)
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
    against = ((warm.get("extra") or {}).get("data_reference") or {}) if warm is not None else None
    scanned = same_data if same_data is not None else scan_data(spec, generate, against)
    if scanned is None:  # keel validate: the data is still to be generated
        return Plan(-1, -1, [0] * spec.run.epochs, cpus_per_worker)
    if warm is not None and spec.init_from.preprocess == "keep":
        scanned = replace(scanned, preprocess=kept_preprocess(scanned.preprocess, warm, spec))
    pools, usable = scanned.epoch_rows, scanned.train_rows - scanned.dropped_rows.get("train", 0)
    steps, at_max = (steps_for(pools, n, data.batch_size) for n in (scaling.min_workers, scaling.max_workers))
    if at_max[-1] == 0:
        raise BadInput(f"data.batch_size: {data.batch_size} x {scaling.max_workers} workers is more than the "
                       f"{usable} usable training rows in {data.train}")
    if min(at_max) == 0:
        raise BadInput(f"data.curriculum.start_fraction: the first epochs' pool is smaller than one global batch "
                       f"({data.batch_size} x {scaling.max_workers})")
    return replace(scanned, steps_per_epoch=steps, cpus_per_worker=cpus_per_worker)


def check_local_storage(run_dir: Path) -> None:
    """The run directory can be made: no part of its path is a file, and this user may write where it starts
    (found here, before Ray starts, not as a traceback in the driver)."""
    for part in (run_dir, *run_dir.parents):
        if part.exists():
            if not part.is_dir():
                raise BadInput(f"run.storage_path: {part} is a file, not a directory")
            if not os.access(part, os.W_OK | os.X_OK):
                raise BadInput(f"run.storage_path: {part} is not writable by this user; choose another run.storage_path")
            return


STATE_KIND = {"sgd": "sgd", "adam": "adam", "adamw": "adam", "rmsprop": "rmsprop"}  # optimizers whose states interchange


def check_resume_fits(spec: JobSpec, model=None) -> None:
    """A run whose directory holds checkpoints resumes from the newest: this job's model and optimizer must fit
    it. Checked here, before Ray starts and before the run directory's config.yaml is rewritten; the workers'
    own model check (train/resume.py) remains for runs on object storage, whose state files are not read twice."""
    if is_remote(spec.run.storage_path):
        return
    import yaml

    from orchestrator.train.checkpointing import (CONFIG_FILE, list_checkpoints, mapped_payload, model_mismatch,
                                                  resume_mismatch)

    for directory in reversed(list_checkpoints(Path(spec.run.storage_path) / spec.run.name)):
        try:
            saved, written_with = mapped_payload(directory), yaml.safe_load((directory / CONFIG_FILE).read_text())
        except Exception:  # unreadable or damaged: resume verifies it and falls back to an older one
            continue
        resuming_from = f"run.name {spec.run.name} resumes from {directory}"
        if model is None:
            import torch

            from orchestrator.models import build_model

            with torch.device("meta"):  # shapes only: nothing allocated, however large the model
                model = build_model(spec.model, spec.data)
        mismatch = model_mismatch(model.state_dict(), saved["model"])
        if mismatch:
            raise BadInput(resume_mismatch(directory, mismatch, spec.run.name))
        trained_on = ((written_with or {}).get("data") or {}).get("preprocess") or {}
        for name in ("standardize", "impute"):  # the network learned on inputs prepared this way
            now = getattr(spec.data.preprocess, name)
            if trained_on.get(name, now) != now:
                raise BadInput(f"data.preprocess.{name}: {now}, but {resuming_from}, trained on inputs with {name} "
                               f"{trained_on[name]}; set data.preprocess.{name}: {trained_on[name]}, or a new run.name")
        before = ((written_with or {}).get("optimizer") or {}).get("name")
        if before and STATE_KIND.get(before) != STATE_KIND.get(spec.optimizer.name):  # fails at the first step
            raise BadInput(f"optimizer.name: {spec.optimizer.name}, but {resuming_from}, written with {before}, whose "
                           f"state does not load into {spec.optimizer.name}; use {before}, or a new run.name")
        from orchestrator.train.optim import parameter_groups
        from orchestrator.train.warm_start import freeze

        if spec.init_from.freeze:
            freeze(model, spec.init_from.freeze)
        ours = [len(g["params"]) for g in parameter_groups(model, spec.optimizer, spec.regularization,
                                                           lr_multipliers=spec.init_from.lr_multipliers)]
        theirs = [len(g["params"]) for g in saved["optimizer"]["param_groups"]]
        if ours != theirs:
            raise BadInput(f"regularization.exclude_norm_and_bias: this job groups the optimizer's parameters as "
                           f"{ours}, but {resuming_from}, whose groups are {theirs} (that, init_from.freeze or "
                           "init_from.lr_multipliers changed?); put it back, or a new run.name")
        return


def scan_data(spec: JobSpec, generate: bool, against: Optional[dict] = None) -> Optional[Plan]:
    """The data part of a plan: both splits scanned and checked, preprocessing fitted on the training split,
    the training rows of every epoch (the curriculum pool grows), the split's drift reference, and (given a
    checkpoint's reference) the drift from it. None: missing, and not to be generated now."""
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
    asked_by = {**{c: "data.features" for c in data.feature_columns}, data.label: "data.label",
                **{c: "data.curriculum.score" for c in extra}}
    scans = {split: scan_split(resolve(getattr(data, split)), f"data.{split}", data.feature_columns, data.label,
                               data.num_classes, data.shape, extra_columns=extra if split == "train" else [],
                               scorer=scorer if split == "train" else None, asked_by=asked_by)
             for split in ("train", "val")}
    dropped = {split: check_rows(scan, data, f"data.{split}") for split, scan in scans.items()}
    for name, path in data.extra_val.items():  # checked like val: present, well-formed, the same shape and labels
        where = f"data.extra_val.{name}"
        check_rows(scan_split(resolve(path), where, data.feature_columns, data.label, data.num_classes, data.shape,
                              asked_by=asked_by), data, where)
    preprocess = fit_preprocess(scans["train"], data.preprocess, data.shape, data.num_classes, data.on_bad_rows,
                                soft_labels=data.augment.soft_labels)
    usable = scans["train"].rows - dropped["train"]
    pools, limits = [usable] * spec.run.epochs, None
    if data.curriculum.enabled:
        scores = np.asarray(scans["train"].extra["score" if cur.checkpoint else cur.score], dtype=np.float64)
        limits = curriculum_thresholds(scores, data.curriculum, spec.run.epochs)
        pools = [min(usable, n) for n in pool_sizes(scores, limits)]
    from orchestrator.data import drift

    shift = None
    if against is not None:
        shift = drift.compare(against, scans["train"].sample, data.shape, data.feature_columns) if against else \
            {"comparable": False, "reason": "the checkpoint has no data reference (written before Keel kept one)"}
    return Plan(scans["train"].rows, scans["val"].rows, [], 0.0, preprocess, limits, dropped, pools,
                drift.reference(scans["train"].sample, data.shape), shift)


def resolved(spec: JobSpec) -> JobSpec:
    """The spec with local paths made absolute: workers and read tasks run in other directories."""
    spec = spec.model_copy(deep=True)
    spec.data.train, spec.data.val = resolve(spec.data.train), resolve(spec.data.val)
    spec.data.extra_val = {name: resolve(path) for name, path in spec.data.extra_val.items()}
    spec.run.storage_path = resolve(spec.run.storage_path)
    if spec.init_from.checkpoint:
        spec.init_from.checkpoint = resolve(spec.init_from.checkpoint)
    return spec


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


def kept_preprocess(fitted: PreprocessState, payload: dict, spec: JobSpec) -> PreprocessState:
    """init_from.preprocess: keep: the checkpoint's standardisation and imputation statistics (the network
    learned on inputs scaled that way); label handling and bad-row policy stay this job's."""
    saved = (payload.get("extra") or {}).get("preprocess") or {}
    stats = {k: np.asarray(saved[k], dtype=np.float32) if saved.get(k) is not None else None for k in ("mean", "std", "fill")}
    width = int(np.prod(spec.data.shape))
    for name, value in stats.items():
        if value is not None and value.size != width:
            raise BadInput(f"init_from.preprocess: keep, but the checkpoint's {name} has {value.size} features and the "
                           f"data has {width} (use refit)")
    return replace(fitted, **stats)
