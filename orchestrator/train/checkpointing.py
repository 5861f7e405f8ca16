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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from orchestrator.models import unwrap

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "manifest.json"


def save_checkpoint(directory: str | os.PathLike, comps, *, epoch: int, spec_yaml: str, extra: dict | None = None) -> Path:
    st = comps.state
    payload = {
        **st.training_state(),  # model, optimizer, schedule, scaler
        "safeguards": comps.safeguards.state_dict(),
        "epoch": epoch,
        "step": st.step,
        "extra": extra or {},
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic(directory / STATE_FILE, lambda tmp: torch.save(payload, tmp))
    _atomic(directory / CONFIG_FILE, lambda tmp: tmp.write_text(spec_yaml))
    manifest = {name: {"bytes": (directory / name).stat().st_size, **file_digest(directory / name)}
                for name in (STATE_FILE, CONFIG_FILE)}
    _atomic(directory / MANIFEST_FILE, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
    return directory


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


DIGEST_CHUNK = 64 << 20  # bytes per independently hashed piece of a file


def file_digest(path: Path, workers: int | None = None, piece_bytes: int = DIGEST_CHUNK) -> dict:
    """sha256 of each 64 MB piece of the file, the pieces hashed in parallel threads (hashlib releases the
    GIL). On a 1 GB state one serial sha256 cost 70% of the save on 2 cores, the pieces 38%; it falls with
    more cores (benchmarks/checkpoint_cost.py)."""
    size = path.stat().st_size
    offsets = list(range(0, size, piece_bytes)) or [0]
    workers = workers or min(8, os.cpu_count() or 1, len(offsets))
    fd = os.open(path, os.O_RDONLY)
    try:
        def piece(offset: int) -> str:
            digest = hashlib.sha256()
            end = min(offset + piece_bytes, size)
            while offset < end:
                block = os.pread(fd, min(8 << 20, end - offset), offset)
                if not block:
                    break
                digest.update(block)
                offset += len(block)
            return digest.hexdigest()

        if workers == 1:
            pieces = [piece(o) for o in offsets]
        else:
            with ThreadPoolExecutor(workers) as pool:
                pieces = list(pool.map(piece, offsets))
    finally:
        os.close(fd)
    return {"sha256_pieces": pieces, "piece_bytes": piece_bytes}


def _sha256(path: Path) -> str:  # the manifests of checkpoints written before file_digest
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _matches(path: Path, expected: dict) -> bool:
    if "sha256_pieces" in expected:
        return file_digest(path, piece_bytes=expected["piece_bytes"])["sha256_pieces"] == expected["sha256_pieces"]
    return _sha256(path) == expected.get("sha256")


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
        if not _matches(path, expected):
            raise CorruptCheckpoint(f"{path}: checksum does not match the manifest (corrupted)")


def read_payload(directory: str | os.PathLike) -> dict:
    """The checkpoint's state, on the CPU (loading copies it to the model's device)."""
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=False)


def mapped_payload(directory: str | os.PathLike) -> dict:
    """The checkpoint's state with its tensors mapped from disk, not read: shapes and structure, cheaply."""
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=False, mmap=True)


def model_mismatch(ours: dict, saved: dict) -> str | None:
    """The first way a checkpoint's model state does not fit this model's state dict, in words, or None."""
    for key, tensor in ours.items():
        if key not in saved:
            return f"the checkpoint has no {key} {_why_keys_differ(key, in_checkpoint=False)}"
        if getattr(saved[key], "shape", None) != getattr(tensor, "shape", None):  # a module's extra state has none
            return (f"{key} is {tuple(getattr(saved[key], 'shape', ()))} in the checkpoint, "
                    f"{tuple(getattr(tensor, 'shape', ()))} in this model (a different model?)")
    extra = sorted(set(saved) - set(ours))
    if extra:
        return f"the checkpoint has {extra[0]}, which this model does not {_why_keys_differ(extra[0], in_checkpoint=True)}"
    return None


def resume_mismatch(where, mismatch: str, run_name: str | None = None) -> str:
    """The one line for a run whose model does not fit the checkpoint it resumes from (driver and workers)."""
    resuming = f" (run.name {run_name} resumes from it)" if run_name else ""
    return (f"{where}: the job's model does not fit this run's checkpoint{resuming}: {mismatch}; "
            "use the model it was written with, or a new run.name")


def _why_keys_differ(key: str, in_checkpoint: bool) -> str:
    """A transformer's QK-layernorm (on by default since model.qk_norm: auto) is the likely reason a key is on
    one side only, and one setting mends it; anything else is a different model."""
    if key.endswith(("q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias")):
        return (f"(trained {'with' if in_checkpoint else 'without'} QK-layernorm? "
                f"set model.qk_norm: {str(in_checkpoint).lower()})")
    return "(a different model?)"


PLATEAU_PROGRESS = ("best", "num_bad_epochs", "cooldown_counter", "last_epoch")  # not its factor or patience


def apply_payload(payload: dict, comps, keep_hyperparameters: bool = False, replay_steps: int | None = None) -> None:
    """Restore `comps` in place from a checkpoint's payload.

    keep_hyperparameters: take weights, optimizer moments and guard state from the checkpoint but keep
    this spec's LR, weight decay, momentum... (PBT's exploit: a clone continues a better trial's weights
    under mutated hyper-parameters; a re-run that changed them, train/changed_settings.py). Its own LR
    schedule is then replayed to `replay_steps`, the steps its own plan takes to the end of the checkpoint's
    epoch (a mutated batch size changes steps per epoch: replaying the donor's count put the LR at the wrong
    point, and ran one_cycle past its end); a plateau schedule keeps the cuts it had made."""
    st = comps.state
    st.step = payload["step"]
    if not keep_hyperparameters:
        st.load_training_state(payload)  # model, optimizer, schedule, scaler
    else:
        ours = [{k: v for k, v in g.items() if k != "params"} for g in st.optimizer.param_groups]
        unwrap(st.model).load_state_dict(payload["model"])
        st.optimizer.load_state_dict(payload["optimizer"])
        for group, hyper in zip(st.optimizer.param_groups, ours):
            group.update(hyper)
        steps = payload["schedule"]["per_step"]["last_epoch"] if replay_steps is None else replay_steps
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": replaying on purpose
            warnings.simplefilter("ignore")
            for _ in range(steps):
                comps.schedule.step()
        saved_plateau = payload["schedule"].get("plateau")
        if comps.schedule.plateau is not None and saved_plateau:
            comps.schedule.plateau.__dict__.update({k: saved_plateau[k] for k in PLATEAU_PROGRESS})
            if saved_plateau["last_epoch"] > 0:  # past warmup, where a plateau schedule's LR moves only by its cuts
                for group, saved in zip(st.optimizer.param_groups, payload["optimizer"]["param_groups"]):
                    group["lr"] *= min(1.0, saved["lr"] / saved.get("initial_lr", saved["lr"]))  # the cuts so far
        st.step = steps if replay_steps is not None else st.step
        if st.scaler is not None and payload["scaler"] is not None:
            st.scaler.load_state_dict(payload["scaler"])
    comps.safeguards.load_state_dict(payload["safeguards"])


def load_checkpoint(directory: str | os.PathLike, comps, keep_hyperparameters: bool = False,
                    replay_steps: int | None = None) -> dict:
    """Restore `comps` in place from one checkpoint directory (one process); returns the payload."""
    payload = read_payload(directory)
    apply_payload(payload, comps, keep_hyperparameters, replay_steps)
    return payload


def state_fingerprint(state: dict) -> str:
    """sha256 over a state dict's tensors (names, dtypes, shapes, bytes): equal on two ranks, or to a
    checkpoint file's, only if the weights are bit for bit the same."""
    digest = hashlib.sha256()
    for name, tensor in state.items():
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint directories of a run, oldest first (Ray names them by timestamp)."""
    return sorted(p for p in Path(run_dir).glob("checkpoint_*") if p.is_dir())
