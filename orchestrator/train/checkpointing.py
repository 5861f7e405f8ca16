"""Checkpoint contents: everything needed to continue exactly where a run stopped.

One file, `state.pt`: model (unwrapped from DDP), optimizer, schedule, AMP
scaler, safeguard state, epoch and step. Next to it, `config.yaml`: the
resolved job spec the checkpoint was trained with, and `manifest.json`: size
and sha256 of every file, written last. Every file is written to a temporary
name and renamed, so a crash never leaves a half-written file under the real
name; a checkpoint without a matching manifest is not trusted at resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch

from orchestrator.models import unwrap

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "manifest.json"


def save_checkpoint(directory: str | os.PathLike, comps, *, epoch: int, spec_yaml: str, extra: dict | None = None) -> Path:
    st = comps.state
    payload = {
        "model": unwrap(st.model).state_dict(),
        "optimizer": st.optimizer.state_dict(),
        "schedule": comps.schedule.state_dict(),
        "scaler": st.scaler.state_dict() if st.scaler is not None else None,
        "safeguards": comps.safeguards.state_dict(),
        "epoch": epoch,
        "step": st.step,
        "extra": extra or {},
    }
    directory = Path(directory)
    _atomic(directory / STATE_FILE, lambda tmp: torch.save(payload, tmp))
    _atomic(directory / CONFIG_FILE, lambda tmp: tmp.write_text(spec_yaml))
    manifest = {name: {"bytes": (directory / name).stat().st_size, "sha256": _sha256(directory / name)}
                for name in (STATE_FILE, CONFIG_FILE)}
    _atomic(directory / MANIFEST_FILE, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
    return directory


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class CorruptCheckpoint(Exception):
    """A checkpoint file that does not match its manifest (the message names the file)."""


def verify_checkpoint(directory: str | os.PathLike) -> None:
    directory = Path(directory)
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CorruptCheckpoint(f"{manifest_path}: missing (the checkpoint was never completed)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError:
        raise CorruptCheckpoint(f"{manifest_path}: not valid JSON") from None
    for name, expected in manifest.items():
        path = directory / name
        if not path.is_file():
            raise CorruptCheckpoint(f"{path}: missing")
        if path.stat().st_size != expected["bytes"]:
            raise CorruptCheckpoint(f"{path}: {path.stat().st_size} bytes, manifest says {expected['bytes']} (truncated?)")
        if _sha256(path) != expected["sha256"]:
            raise CorruptCheckpoint(f"{path}: checksum does not match the manifest (corrupted)")


def newest_good_checkpoint(candidates: list[Path], warn) -> Path | None:
    """The first of `candidates` (newest first) that verifies; `warn(message)` for each one skipped."""
    for directory in candidates:
        try:
            verify_checkpoint(directory)
            return directory
        except CorruptCheckpoint as exc:
            warn(f"checkpoint {exc}; falling back to an older one")
    return None


def load_checkpoint(directory: str | os.PathLike, comps, map_location="cpu", keep_hyperparameters: bool = False) -> dict:
    """Restore `comps` in place; returns the payload (for epoch/step).

    keep_hyperparameters: take weights, optimizer moments and guard state from the checkpoint but keep
    this spec's LR, weight decay, momentum... (PBT's exploit: a clone continues a better trial's weights
    under mutated hyper-parameters). The LR schedule is then replayed to the checkpoint's step."""
    payload = torch.load(Path(directory) / STATE_FILE, map_location=map_location, weights_only=False)
    st = comps.state
    unwrap(st.model).load_state_dict(payload["model"])
    ours = [{k: v for k, v in g.items() if k != "params"} for g in st.optimizer.param_groups]
    st.optimizer.load_state_dict(payload["optimizer"])
    if keep_hyperparameters:
        for group, hyper in zip(st.optimizer.param_groups, ours):
            group.update(hyper)
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": replaying on purpose
            warnings.simplefilter("ignore")
            for _ in range(payload["schedule"]["per_step"]["last_epoch"]):  # steps taken, skipped ones not
                comps.schedule.step()
    else:
        comps.schedule.load_state_dict(payload["schedule"])
    if st.scaler is not None and payload["scaler"] is not None:
        st.scaler.load_state_dict(payload["scaler"])
    comps.safeguards.load_state_dict(payload["safeguards"])
    st.step = payload["step"]
    return payload


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint directories of a run, oldest first (Ray names them by timestamp)."""
    return sorted(p for p in Path(run_dir).glob("checkpoint_*") if p.is_dir())
