"""Fine-tuning: a new run that starts from another run's checkpoint (`init_from`).

Only the weights (and BN statistics) come across: the optimizer, schedule and guards start fresh, as the
new data and LR ask. The final classifier is re-initialised when its shape differs (a new num_classes).
Name prefixes freeze parameters or scale their LR. Everything that can be wrong (not a checkpoint, shapes
that do not fit the new model, a prefix that names nothing) is found on the driver, before Ray starts.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

from orchestrator.errors import BadInput
from orchestrator.models import unwrap
from orchestrator.train.checkpointing import model_mismatch


def head_names(model: nn.Module) -> set[str]:
    """State-dict keys of the final Linear layer (the classifier)."""
    last = None
    for name, module in unwrap(model).named_modules():
        if isinstance(module, nn.Linear):
            last = name
    return {f"{last}.{p}" for p, _ in unwrap(model).get_submodule(last).named_parameters()} if last is not None else set()


def weights_to_load(model: nn.Module, saved: dict, reset_head: str) -> tuple[dict, list[str]]:
    """(the checkpoint's tensors this model takes, the keys left to their fresh init). Raises ValueError
    naming the first key that does not fit."""
    ours = unwrap(model).state_dict()
    head = head_names(model)
    head_differs = any(k in saved and saved[k].shape != ours[k].shape for k in head)
    if head_differs and reset_head == "no":
        shapes = ", ".join(f"{k} {tuple(saved[k].shape)} -> {tuple(ours[k].shape)}" for k in sorted(head) if k in saved)
        raise ValueError(f"init_from.reset_head: no, but the classifier's shape differs ({shapes})")
    reset = sorted(head) if reset_head == "yes" or head_differs else []
    loaded = {k: v for k, v in saved.items() if k not in reset}
    mismatch = model_mismatch({k: v for k, v in ours.items() if k not in reset}, loaded)
    if mismatch:
        raise ValueError(f"init_from.checkpoint: {mismatch}")
    return loaded, reset


def prefix_for(name: str, prefixes) -> Optional[str]:
    """The longest prefix in `prefixes` that `name` starts with."""
    hits = [p for p in prefixes if name.startswith(p)]
    return max(hits, key=len) if hits else None


def check_prefixes(model: nn.Module, init) -> None:
    names = [n for n, _ in unwrap(model).named_parameters()]
    tops = sorted({n.split(".")[0] + "." for n in names})
    for field, prefixes in (("freeze", init.freeze), ("lr_multipliers", list(init.lr_multipliers))):
        for prefix in prefixes:
            if not any(n.startswith(prefix) for n in names):
                raise BadInput(f"init_from.{field}: {prefix!r} matches no parameter (names start with {', '.join(tops)})")
    if init.freeze and all(prefix_for(n, init.freeze) for n in names):
        raise BadInput(f"init_from.freeze: {init.freeze} freezes every parameter; nothing would train")


def freeze(model: nn.Module, prefixes: list[str]) -> int:
    """requires_grad off for parameters under the prefixes (before DDP wraps the model); how many."""
    frozen = 0
    for name, p in unwrap(model).named_parameters():
        if prefix_for(name, prefixes):
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


@contextmanager
def checkpoint_dir(location: str) -> Iterator[str]:
    """A local directory holding the checkpoint: the path itself, or a downloaded copy of an s3://... one,
    removed on leaving (rank 0 reads it in a worker that is killed, not exited, when the run ends).
    A run directory stands for its newest checkpoint."""
    from orchestrator.storage import RemoteCheckpoint, filesystem, is_remote, remote_checkpoints
    from orchestrator.train.checkpointing import STATE_FILE, list_checkpoints

    if not is_remote(location):
        if not os.path.isdir(location):
            raise BadInput(f"init_from.checkpoint: {location}: no such directory")
        if not os.path.isfile(os.path.join(location, STATE_FILE)) and list_checkpoints(location):
            yield str(list_checkpoints(location)[-1])
        else:
            yield location
        return
    fs, path = filesystem(location, "init_from.checkpoint")
    inside = remote_checkpoints(fs, path)
    copy = inside[-1] if inside else RemoteCheckpoint(fs, path)
    try:
        yield os.fspath(copy)
    finally:
        copy.discard()


def read_checkpoint(location: str) -> dict:
    """The checkpoint's payload, verified against its manifest; BadInput naming init_from.checkpoint."""
    from orchestrator.train.checkpointing import CONFIG_FILE, STATE_FILE, CorruptCheckpoint, read_payload, verify_checkpoint

    with checkpoint_dir(location) as directory:
        if not (os.path.isfile(os.path.join(directory, STATE_FILE)) and os.path.isfile(os.path.join(directory, CONFIG_FILE))):
            raise BadInput(f"init_from.checkpoint: {location}: not a Keel checkpoint (needs {STATE_FILE} and {CONFIG_FILE})")
        try:
            verify_checkpoint(directory)
        except CorruptCheckpoint as exc:
            raise BadInput(f"init_from.checkpoint: {exc}") from None
        return read_payload(directory)


def check_warm_start(spec, model: nn.Module) -> dict:
    """Driver side, before Ray: the checkpoint loads into this spec's model. Returns its payload."""
    payload = read_checkpoint(spec.init_from.checkpoint)
    try:
        weights_to_load(model, payload["model"], spec.init_from.reset_head)
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    check_prefixes(model, spec.init_from)
    return payload


@torch.no_grad()
def warm_start(model: nn.Module, spec) -> dict:
    """Worker side: rank 0 reads the checkpoint and loads what fits, then every rank takes rank 0's
    parameters and buffers (one read, identical replicas). Returns what was loaded, for the first report."""
    from orchestrator.stability.distributed import broadcast_module_state, broadcast_object, rank

    reset: list[str] = []
    if rank() == 0:
        weights, reset = weights_to_load(model, read_checkpoint(spec.init_from.checkpoint)["model"], spec.init_from.reset_head)
        unwrap(model).load_state_dict(weights, strict=False)
    broadcast_module_state(unwrap(model))
    from orchestrator.train.checkpointing import state_fingerprint

    return {"checkpoint": spec.init_from.checkpoint, "reset": broadcast_object(reset),
            "fingerprint": state_fingerprint(unwrap(model).state_dict())}
