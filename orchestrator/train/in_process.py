"""One-worker runs in Keel's own process: Ray Train's local mode (`ScalingConfig(num_workers=0)`).

A one-worker run has no peer to synchronize with, yet a worker group costs it a controller, a worker
process, a synchronization actor and Ray Data's split coordinator: measured on this 2-core machine, a bare
fit 16-19 s instead of 0-2 s. So a one-worker CPU run on the embedded local Ray, and a one-worker sweep
trial (already a process of its own that Tune placed), run the same per-worker loop where they are.

Local mode keeps only the last reported `Checkpoint` object and forwards nothing to Tune, so here Keel does
what Ray Train's controller does for a worker group: it persists each checkpoint into the run directory
under Ray's own name (`checkpoint_<timestamp>`), keeps `run.keep_checkpoints` of them, and (in a sweep
trial) hands each report and its stored checkpoint to the trial's thread. Resume finds them by listing.

What a worker group has and this has not: restarts (`run.max_failures` > 0 keeps the worker group),
GPUs, elastic sizes, and a driver that stays up if the training process dies.
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import Optional

from orchestrator.spec import JobSpec
from orchestrator.storage import join


def one_cpu_worker(workers, gpu: bool, max_failures: int) -> bool:
    """What a run must be to train in process, wherever it runs: one CPU worker, no restarts asked for."""
    return workers == 1 and not gpu and max_failures == 0


def runs_in_process(spec: JobSpec) -> bool:
    """A `keel run` of one CPU worker on the embedded local Ray (the driver is on the machine that trains;
    on a cluster the driver may be a laptop). Sweep trials: sweep/trial.py, trains_in_process."""
    from orchestrator.ray_session import cluster_address

    s = spec.scaling  # the address may also come from RAY_ADDRESS: inside a submitted job, the cluster's
    return one_cpu_worker(s.num_workers, s.use_gpu, spec.run.max_failures) and cluster_address(s.address) is None


def _run_location(spec: JobSpec, storage: Optional[dict]):
    import pyarrow.fs

    if storage is not None:
        return storage["fs"], storage["run_path"]
    return pyarrow.fs.LocalFileSystem(), join(spec.run.storage_path, spec.run.name)


def stored_checkpoints(spec: JobSpec, storage: Optional[dict]) -> list[str]:
    """The run's checkpoint directories, oldest first (by their timestamp names, as Ray names them)."""
    import pyarrow.fs

    fs, run_path = _run_location(spec, storage)
    entries = fs.get_file_info(pyarrow.fs.FileSelector(run_path, allow_not_found=True))
    return sorted(e.path for e in entries
                  if e.type == pyarrow.fs.FileType.Directory and e.base_name.startswith("checkpoint_"))


def stored_checkpoint(path: str, spec: JobSpec, storage: Optional[dict]):
    """A checkpoint directory of the run as a `ray.train.Checkpoint` on the run's filesystem."""
    import ray.train

    return ray.train.Checkpoint(path, filesystem=_run_location(spec, storage)[0])


def newest_checkpoint(spec: JobSpec, storage: Optional[dict]):
    """The run's newest stored checkpoint as a `ray.train.Checkpoint`, or None."""
    paths = stored_checkpoints(spec, storage)
    return stored_checkpoint(paths[-1], spec, storage) if paths else None


def persist_checkpoint(directory: str, spec: JobSpec, storage: Optional[dict]):
    """Copy a checkpoint written in a temporary directory into the run directory, then delete the oldest
    beyond run.keep_checkpoints. Locally it is copied under a hidden name and renamed, so a crash or Ctrl-C
    leaves no half-copied checkpoint under a real name; on object storage the manifest, checked at resume,
    tells a truncated upload apart (as for Ray Train's own uploads)."""
    import pyarrow.fs
    import ray.train

    fs, run_path = _run_location(spec, storage)
    name = f"checkpoint_{datetime.now():%Y-%m-%d_%H-%M-%S.%f}"  # Ray Train's own naming
    target = join(run_path, name)
    local = isinstance(fs, pyarrow.fs.LocalFileSystem)
    staging = join(run_path, f".{name}.partial") if local else target
    fs.create_dir(staging, recursive=True)
    pyarrow.fs.copy_files(directory, staging, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs)
    if local:
        os.replace(staging, target)
    for old in stored_checkpoints(spec, storage)[:-spec.run.keep_checkpoints]:
        fs.delete_dir(old)
    return ray.train.Checkpoint(target, filesystem=fs)


def report_epoch(metrics: dict, checkpoint_dir: Optional[str], in_process: bool, spec: JobSpec,
                 storage: Optional[dict], forward=None) -> None:
    """One epoch's report. In a worker group: `ray.train.report` (a barrier; Ray Train stores the checkpoint).
    In process: store the checkpoint here and hand both to a sweep trial's thread (`forward`), as the
    trial's Train callback does for a worker group (sweep/trial.py, ForwardReports). Not `ray.train.report`:
    inside a Tune trial's process Ray 2.60 refuses it (and get_context, get_checkpoint, prepare_model) with a
    DeprecationWarning, and local mode would only keep the last one."""
    import ray
    import ray.train

    if not in_process:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)
        return
    stored = persist_checkpoint(checkpoint_dir, spec, storage) if checkpoint_dir else None
    if forward is not None:
        ray.get(forward.put.remote({"metrics": dict(metrics),
                                    "checkpoint": (stored.path, stored.filesystem) if stored else None}))
