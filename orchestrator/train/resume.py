"""Resume: one decision, taken by rank 0 and broadcast, so every rank continues from the same state.

Each rank sees checkpoints through its own filesystem view: a local copy Ray downloaded for it, an NFS
cache, a PBT donor's path that only one node can read. Ranks that chose on their own could resume
from different epochs, and then hang at the first collective or train replicas that silently differ.
So:
  1. rank 0 verifies the candidates (newest first, against their manifests) and broadcasts its pick;
  2. every rank verifies and reads that same checkpoint from its own view; if any rank cannot, every
     rank takes rank 0's copy, broadcast (slower, but the same state everywhere, and no hang);
  3. parameters and buffers are broadcast from rank 0 after loading, and a fingerprint of the weights
     is gathered from every rank: the `resumed` event carries them, and they must be equal.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ray.train

from orchestrator.models import unwrap
from orchestrator.stability.bad_batches import BadBatches
from orchestrator.storage import remote_checkpoints
from orchestrator.stability.distributed import all_gather_objects, broadcast_module_state, broadcast_object, rank
from orchestrator.train.changed_settings import hyper_parameter_changes
from orchestrator.train.in_process import newest_checkpoint, stored_checkpoint
from orchestrator.train.checkpointing import (CorruptCheckpoint, apply_payload, list_checkpoints, model_mismatch,
                                              read_payload, resume_mismatch, state_fingerprint, verify_checkpoint)


@dataclass
class Restored:
    checkpoint: Path         # the chosen checkpoint, as rank 0 sees it (other ranks: its name)
    epoch: int               # the epoch saved in it (training continues at epoch + 1)
    fingerprints: list[str]  # per rank, after loading: one value, or the ranks disagree
    copied_from_rank0: list[str]  # why ranks that could not read the checkpoint themselves took rank 0's
    changed: list[str]       # this job's hyper-parameters that differ from the checkpoint's, now in force


def newest_good_index(candidates: list[Path], warn: Callable[[str], None]) -> int | None:
    """Index of the first of `candidates` (newest first) that verifies; `warn` for each one skipped."""
    for index, directory in enumerate(candidates):
        try:
            verify_checkpoint(directory)
            return index
        except CorruptCheckpoint as exc:
            warn(f"checkpoint {exc}; falling back to an older one")
    return None


def _own_view(candidates: list[Path], index: int, name: str) -> Path | None:
    """This rank's copy of rank 0's pick. The first candidate is Ray's latest checkpoint wherever this
    rank's copy of it lives (a download has its own name); older ones are found by name, since a rank's
    directory listing may differ from rank 0's."""
    if index == 0:
        return candidates[0] if candidates else None
    return next((c for c in candidates[1:] if c.name == name), None)


def _read_own_copy(directory: Path | None, name: str) -> tuple[dict | None, str | None]:
    if directory is None:
        return None, f"rank {rank()}: {name}: not found"
    try:
        verify_checkpoint(directory)
        return read_payload(directory), None
    except (CorruptCheckpoint, OSError, EOFError, RuntimeError, pickle.UnpicklingError) as exc:
        return None, f"rank {rank()}: {exc}"


def restore_agreed(candidates: list[Path], comps, warn: Callable[[str], None], keep_hyperparameters: bool = False,
                   steps_per_epoch: list[int] | None = None, spec=None) -> Restored | None:
    """Every rank calls this with its own view of the candidates (newest first; the first is Ray's latest);
    `warn` is heard from rank 0. None: no intact checkpoint, every rank starts from scratch.
    steps_per_epoch: this run's own plan; a clone (keep_hyperparameters) replays its schedule to the end of the
    checkpoint's epoch under it, not the donor's step count. spec: this job's, for a re-run of its own run:
    hyper-parameters it changed are kept the same way (rank 0 compares, every rank follows)."""
    pick = None
    if rank() == 0:
        index = newest_good_index(candidates, warn)
        pick = None if index is None else (index, candidates[index].name)
    pick = broadcast_object(pick)
    if pick is None:
        return None
    index, name = pick
    payload, problem = _read_own_copy(_own_view(candidates, index, name), name)
    problems = [p for p in all_gather_objects(problem) if p]
    if problems:
        payload = broadcast_object(payload if rank() == 0 else None)
        if payload is None:  # rank 0 itself could not read what it had just verified (deleted meanwhile?)
            raise CorruptCheckpoint(f"{candidates[index]}: unreadable after verification ({'; '.join(problems)})")
        for p in problems:
            warn(f"checkpoint {p}; that rank took rank 0's copy")
    mismatch = model_mismatch(unwrap(comps.state.model).state_dict(), payload["model"])
    if mismatch:  # the same payload on every rank, so every rank stops with this line (torch's own is pages long)
        raise ValueError(resume_mismatch(candidates[index] if rank() == 0 else name, mismatch))
    epoch = payload["epoch"]
    plan_steps = sum(steps_per_epoch[:epoch + 1]) if steps_per_epoch else None
    changed = []
    if spec is not None and not keep_hyperparameters:
        changed = broadcast_object(hyper_parameter_changes(candidates[index], spec, payload, plan_steps)
                                   if rank() == 0 else None)
    keep = keep_hyperparameters or bool(changed)
    apply_payload(payload, comps, keep, plan_steps if keep else None)
    model = unwrap(comps.state.model)
    broadcast_module_state(model)
    fingerprints = all_gather_objects(state_fingerprint(model.state_dict()))
    return Restored(candidates[index] if rank() == 0 else Path(name), epoch, fingerprints, problems, changed)


def latest_checkpoint(spec, storage: dict | None = None, in_process: bool = False):
    """This run's latest checkpoint, the same on every rank (a collective), or None: the newer of Ray Train's
    own (a worker group) and the newest stored in the run directory as rank 0 lists it (a run in process,
    train/in_process.py, stores its checkpoints there itself)."""
    latest = None if in_process else ray.train.get_checkpoint()
    newest = newest_checkpoint(spec, storage) if rank() == 0 else None
    path = broadcast_object(newest.path if newest is not None else None)
    # Ray Train knows only the checkpoints its own runs reported: after a 1-worker run in process stored a newer
    # one, a worker group resumed from Ray's older one and trained an epoch twice (found by trying it). The names
    # are Ray Train's timestamps, so the later name is the newer checkpoint.
    if latest is not None and (path is None or Path(latest.path).name >= Path(path).name):
        return latest
    return stored_checkpoint(path, spec, storage) if path else None


def resume(comps, spec, progress, latest, initial: dict | None, steps_per_epoch: list[int],
           storage: dict | None = None) -> tuple[int, dict | None]:
    """(the epoch to start at, what was loaded): after this run's newest intact checkpoint (`latest`, from
    latest_checkpoint, then its older ones), or, without one of its own, after `initial` = {path,
    keep_hyperparameters} (a sweep trial's restore: PBT's clone of a better trial). (0, None): from scratch.
    storage = {fs, run_path} when the run lives on object storage (older checkpoints are listed there,
    fetched only if looked at)."""
    if (bad_batches := comps.safeguards.find(BadBatches)) is not None:
        bad_batches.recall()  # a crash after the last checkpoint must not forget a rejected batch
    keep_hyperparameters = False
    if latest is None and initial:
        latest = ray.train.Checkpoint(initial["path"], filesystem=initial.get("filesystem"))
        keep_hyperparameters = initial["keep_hyperparameters"]
    if latest is None:
        return 0, None
    newest = Path(latest.path).name  # Ray's own name for it (a downloaded copy's directory is named otherwise)
    if storage is not None:
        older = [c for c in remote_checkpoints(storage["fs"], storage["run_path"]) if c.name < newest]
    else:
        run_dir = Path(spec.run.storage_path) / spec.run.name
        older = [c for c in list_checkpoints(run_dir) if c.name < newest] if run_dir.is_dir() else []
    with latest.as_directory() as directory:
        candidates = [Path(directory), *sorted(older, key=lambda c: c.name, reverse=True)]

        def warn(message: str) -> None:  # name the checkpoint where it is stored, not the copy read here
            message = message.replace(str(directory), str(latest.path))
            for c in older:
                if getattr(c, "_local", None):
                    message = message.replace(c._local, c.path)
            progress.send("warning", message=message)

        try:
            restored = restore_agreed(candidates, comps, warn, keep_hyperparameters, steps_per_epoch, spec)
        finally:
            for c in older:  # the fallbacks fetched from object storage
                if hasattr(c, "discard"):
                    c.discard()
        shown = str(latest.path) if restored and restored.checkpoint == candidates[0] else None
    if restored is None:
        progress.send("warning", message="no intact checkpoint: starting from scratch")
        return 0, None
    if len(set(restored.fingerprints)) > 1:  # cannot happen after the broadcast; if it does, say so loudly
        raise RuntimeError(f"ranks resumed with different weights: {restored.fingerprints}")
    shown = shown or str(getattr(restored.checkpoint, "path", restored.checkpoint))
    loaded = {"checkpoint": shown, "fingerprint": restored.fingerprints[0], "ranks": len(restored.fingerprints)}
    if restored.changed:
        loaded["changed"] = restored.changed
    progress.send("resumed", epoch=restored.epoch + 1, copied_from_rank0=restored.copied_from_rank0, **loaded)
    return restored.epoch + 1, loaded
