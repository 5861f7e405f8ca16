"""Checkpoint contents: everything needed to continue exactly where a run stopped.

One file, `state.pt`: model (unwrapped from DDP), optimizer, schedule, AMP
scaler, safeguard state, epoch and step. Next to it, `config.yaml`: the
resolved job spec the checkpoint was trained with.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


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
    torch.save(payload, directory / STATE_FILE)
    (directory / CONFIG_FILE).write_text(spec_yaml)
    return directory


def load_checkpoint(directory: str | os.PathLike, comps, map_location="cpu") -> dict:
    """Restore `comps` in place; returns the payload (for epoch/step)."""
    payload = torch.load(Path(directory) / STATE_FILE, map_location=map_location, weights_only=False)
    st = comps.state
    unwrap(st.model).load_state_dict(payload["model"])
    st.optimizer.load_state_dict(payload["optimizer"])
    comps.schedule.load_state_dict(payload["schedule"])
    if st.scaler is not None and payload["scaler"] is not None:
        st.scaler.load_state_dict(payload["scaler"])
    comps.safeguards.load_state_dict(payload["safeguards"])
    st.step = payload["step"]
    return payload


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint directories of a run, oldest first (Ray names them by timestamp)."""
    return sorted(p for p in Path(run_dir).glob("checkpoint_*") if p.is_dir())
