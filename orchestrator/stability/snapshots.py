"""An in-memory ring of recent training states, to roll back to without touching disk.

A snapshot is model + optimizer + schedule (+ AMP scaler) state copied to CPU
memory. Every rank keeps its own ring; replicas are identical, so every rank
restores the same state. The ring starts with the state the run began from
(fresh init, or the on-disk checkpoint it resumed from), so there is always
somewhere to go back to.
"""

from __future__ import annotations

import copy
import threading
from collections import deque
from typing import Optional

import torch

from orchestrator.models import unwrap


def _copy_into(dst, src):
    """A CPU copy of `src` (tensors, dicts, lists), written into `dst`'s tensors wherever shape and dtype match.
    Reusing a dropped snapshot's memory keeps a full ring at its size (allocating first held one snapshot more:
    1.2 GB more at 100M parameters) and skips fresh pages (measured at 101M: 0.49 s for the first copy into new
    memory, 0.10-0.11 s into recycled). A CUDA tensor goes into pinned memory without blocking, on the
    current stream: whoever reads the copy first waits for that stream (`_finish`)."""
    if isinstance(src, torch.Tensor):
        fits = (isinstance(dst, torch.Tensor) and dst.device.type == "cpu" and dst.shape == src.shape
                and dst.dtype == src.dtype)
        if src.is_cuda:  # a pageable copy would block the host per tensor and run at a fraction of the bus's rate
            if not (fits and dst.is_pinned()):
                dst = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
            return dst.copy_(src.detach(), non_blocking=True)
        return dst.copy_(src.detach()) if fits else src.detach().to("cpu", copy=True)
    if isinstance(src, dict):
        old = dst if isinstance(dst, dict) else {}
        return {k: _copy_into(old.get(k), v) for k, v in src.items()}
    if isinstance(src, (list, tuple)):
        old = dst if isinstance(dst, (list, tuple)) and len(dst) == len(src) else [None] * len(src)
        return type(src)(_copy_into(a, b) for a, b in zip(old, src))
    return copy.deepcopy(src)


def _cuda_device(state) -> Optional[torch.device]:
    device = getattr(state, "device", None)
    return device if isinstance(device, torch.device) and device.type == "cuda" else None


def _finish(device: Optional[torch.device]) -> None:
    """The asynchronous device-to-host copies queued so far on this thread's stream are done."""
    if device is not None:
        torch.cuda.current_stream(device).synchronize()


def _to_cpu(obj):
    return _copy_into(None, obj)


def float_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    return [b for b in model.buffers() if b.is_floating_point()]


def float_buffer_slots(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """(module, name) of each float buffer, in `model.buffers()`'s order: `module._buffers[name]` is the
    buffer now, even after the module replaced it."""
    slots, seen = [], set()
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.is_floating_point() and id(buffer) not in seen:
                seen.add(id(buffer))
                slots.append((module, name))
    return slots


def snapshot_buffers(model: torch.nn.Module, buffers: Optional[list[torch.Tensor]] = None) -> Optional[torch.Tensor]:
    """The float buffers (BN running statistics) before a step's forward, as one flat copy on the device: one
    kernel, where a clone per buffer was two copies per BN layer every step (80 for a ResNet-18; measured on
    a GPU, where each is a launch). None for a model without float buffers. `buffers`: the model's
    `float_buffers`, if the caller keeps track of them (the loop does: `Safeguards.buffers`)."""
    buffers = float_buffers(model) if buffers is None else buffers
    return torch.cat([b.detach().reshape(-1) for b in buffers]) if buffers else None


@torch.no_grad()
def restore_buffers(model: torch.nn.Module, saved: Optional[torch.Tensor],
                    buffers: Optional[list[torch.Tensor]] = None) -> None:
    """Undo what a skipped step's forward did to the running statistics: a NaN or a 1e4x batch would
    otherwise poison evaluation for hundreds of steps, though its update was dropped."""
    if saved is None:
        return
    buffers = float_buffers(model) if buffers is None else buffers
    for buffer, before in zip(buffers, torch.split(saved, [b.numel() for b in buffers])):
        buffer.copy_(before.view_as(buffer))


def capture(state, into: Optional[dict] = None) -> dict:
    """A CPU copy of the step state's training state (model, optimizer, schedule, scaler), written into the
    tensors of `into` (an evicted snapshot) where they fit."""
    snap = _copy_into(into, state.training_state())
    _finish(_cuda_device(state))  # one wait for all of them, not one per tensor
    return snap


def restore(state, snap: dict) -> None:
    """Load a snapshot. The model's tensors are copied in by load_state_dict, but torch's optimizer adopts a
    state tensor as is when it is already on the right device and dtype (a CPU run), and the next updates
    would then change the snapshot in the ring: a second rollback to it would get the moments of the failed
    attempt. So the rest is loaded from a copy."""
    state.load_training_state({**_to_cpu({k: v for k, v in snap.items() if k != "model"}), "model": snap["model"]})


def capture_in_background(state, into: Optional[dict] = None) -> tuple[dict, threading.Thread]:
    """A snapshot whose large part (parameters and optimizer state) is copied by a thread while the next
    step's forward and backward run: they read the parameters but change neither them nor the optimizer
    state, which only the next optimizer step does, so the caller joins the thread before that. Buffers
    (BN running statistics, written by the forward), the schedule and the scaler are small and copied now.
    CPU state; device state: `capture_on_gpu`."""
    live, old = state.training_state(), into or {}
    old_model = old.get("model") or {}
    params = {name for name, _ in unwrap(state.model).named_parameters()}
    snap = {"model": {k: (v if k in params else _copy_into(old_model.get(k), v)) for k, v in live["model"].items()},
            "schedule": _to_cpu(live["schedule"]), "scaler": _to_cpu(live["scaler"]), "optimizer": live["optimizer"]}

    def copy_large() -> None:
        snap["model"] = {k: _copy_into(old_model.get(k), v) if k in params else v for k, v in snap["model"].items()}
        snap["optimizer"] = _copy_into(old.get("optimizer"), snap["optimizer"])

    thread = threading.Thread(target=copy_large, name="keel-snapshot", daemon=True)
    thread.start()
    return snap, thread


def capture_on_gpu(state, into: Optional[dict] = None) -> tuple[dict, torch.cuda.Event]:
    """A snapshot of device state that the host never waits for: a side stream copies the parameters and the
    optimizer state into pinned host memory, beside the next step's forward and backward, once the last queued
    update has run; the next update waits for that copy on the device (`SnapshotRing.wait`), not on the host.
    Buffers (BN running statistics) are written by that very forward, so they are copied on the main stream,
    ordered before it. Returns (snapshot, the copy's completion event)."""
    device = _cuda_device(state)
    main = torch.cuda.current_stream(device)
    live, old = state.training_state(), into or {}
    old_model = old.get("model") or {}
    params = {name for name, _ in unwrap(state.model).named_parameters()}
    buffers = {k: _copy_into(old_model.get(k), v) for k, v in live["model"].items() if k not in params}
    side = torch.cuda.Stream(device)
    side.wait_stream(main)  # after the last queued update and the buffers' copies: its event covers both
    with torch.cuda.stream(side):
        weights = {k: _copy_into(old_model.get(k), v) for k, v in live["model"].items() if k in params}
        rest = {k: _copy_into(old.get(k), live[k]) for k in live if k != "model"}
    return {"model": {k: weights[k] if k in params else buffers[k] for k in live["model"]}, **rest}, side.record_event()


class SnapshotRing:
    def __init__(self, size: int = 3):
        self.ring: deque[tuple[int, dict]] = deque(maxlen=size)
        self.pending: Optional[threading.Thread] = None
        self.copied: Optional[torch.cuda.Event] = None  # a device snapshot's copy to the host, when it completes
        self.gate_update = False  # that copy still reads the live state: the next update must wait for it
        self.device: Optional[torch.device] = None

    def add(self, step: int, state, background: bool = False) -> None:
        """Keep the state as of `step`. background=True: the large copy overlaps the next step's compute;
        `wait()` (called before the next optimizer step) lets that update go ahead safely, and `pick` finishes it."""
        self.finish()
        # a full ring drops its oldest snapshot now, and the new one is written into that one's memory
        recycled = self.ring.popleft()[1] if len(self.ring) == self.ring.maxlen else None
        self.device = _cuda_device(state)
        if background and self.device is not None:
            snap, self.copied = capture_on_gpu(state, recycled)
            self.gate_update = True
        elif background:
            snap, self.pending = capture_in_background(state, into=recycled)
        else:
            snap = capture(state, into=recycled)
        self.ring.append((step, snap))

    def wait(self) -> None:
        """Before an optimizer step: a copy that still reads the live state holds the update back (a CPU
        thread is joined; on a GPU the device waits for the copy's event, the host goes on)."""
        if self.pending is not None:
            self.pending.join()
            self.pending = None
        if self.copied is not None and self.gate_update:
            torch.cuda.current_stream(self.device).wait_event(self.copied)
            self.gate_update = False

    def finish(self) -> None:
        """Every snapshot in the ring is complete in host memory (before one is read or overwritten)."""
        self.wait()
        if self.copied is not None:
            self.copied.synchronize()
            self.copied = None

    def pick(self, before_step: int, min_age: int) -> Optional[tuple[int, dict]]:
        """The newest snapshot at least `min_age` steps before `before_step` (else the oldest);
        newer ones are dropped: they may already hold the start of the instability."""
        self.finish()
        if not self.ring:
            return None
        chosen = next((item for item in reversed(self.ring) if before_step - item[0] >= min_age), self.ring[0])
        while self.ring and self.ring[-1][0] > chosen[0]:
            self.ring.pop()
        return chosen
