"""Rollback snapshots: a snapshot stays what it was when taken, however often it is restored, and a full ring
writes a new snapshot into the memory of the one it drops."""

import torch
from torch import nn

from orchestrator.stability.snapshots import SnapshotRing, capture, restore
from orchestrator.train.hooks import StepState
from orchestrator.train.schedules import Schedule


def cpu_state(optimizer=torch.optim.Adam) -> StepState:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    opt = optimizer(model.parameters(), lr=0.1)
    schedule = Schedule(torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0), None)
    st = StepState(model=model, optimizer=opt, device=torch.device("cpu"), schedule=schedule)
    train(st, 1)  # the optimizer's state exists
    return st


def train(st: StepState, steps: int, shift: float = 0.0) -> None:
    for _ in range(steps):
        st.optimizer.zero_grad()
        st.model(torch.randn(16, 4) + shift).square().sum().backward()
        st.optimizer.step()


def optimizer_tensors(state_dict: dict) -> list[torch.Tensor]:
    return [t for per_param in state_dict["state"].values() for t in per_param.values() if isinstance(t, torch.Tensor)]


def test_a_second_rollback_to_the_same_snapshot_gets_the_same_optimizer_state():
    for optimizer in (torch.optim.Adam, lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9)):
        st = cpu_state(optimizer)
        ring = SnapshotRing()
        ring.add(1, st)
        expected = capture(st)
        train(st, 3, shift=4.0)
        _, snap = ring.pick(before_step=10, min_age=1)
        restore(st, snap)              # the first rollback ...
        train(st, 3, shift=4.0)        # ... the instability comes back: these updates move the live state
        _, again = ring.pick(before_step=10, min_age=1)
        restore(st, again)             # ... and the second rollback must land on the same state as the first
        live = st.optimizer.state_dict()
        assert all(torch.equal(a, b) for a, b in zip(optimizer_tensors(live), optimizer_tensors(expected["optimizer"])))
        assert all(torch.equal(st.model.state_dict()[k], v) for k, v in expected["model"].items())


def test_a_full_ring_writes_the_new_snapshot_into_the_dropped_ones_memory_and_keeps_the_others():
    for background in (False, True):
        st = cpu_state()
        ring = SnapshotRing(size=2)
        ring.add(1, st, background=background)
        ring.wait()  # as SpikeGuard does before the next update: a background copy reads the live state
        first_weight = ring.ring[0][1]["model"]["0.weight"]
        first_moment = optimizer_tensors(ring.ring[0][1]["optimizer"])[1]
        train(st, 2)
        ring.add(3, st, background=background)
        ring.wait()
        second = capture(st)
        train(st, 2)
        ring.add(5, st, background=background)   # the ring is full: the snapshot of step 1 goes
        third = capture(st)
        ring.wait()
        assert [step for step, _ in ring.ring] == [3, 5]
        newest = ring.ring[-1][1]
        assert newest["model"]["0.weight"].data_ptr() == first_weight.data_ptr()          # its memory, reused
        assert optimizer_tensors(newest["optimizer"])[1].data_ptr() == first_moment.data_ptr()
        assert all(torch.equal(newest["model"][k], v) for k, v in third["model"].items())  # with the new values
        assert all(torch.equal(a, b) for a, b in zip(optimizer_tensors(newest["optimizer"]), optimizer_tensors(third["optimizer"])))
        kept = ring.ring[0][1]
        assert all(torch.equal(kept["model"][k], v) for k, v in second["model"].items())   # the other one untouched


def test_buffers_of_several_sizes_come_back_each_to_its_own_layer():
    from orchestrator.stability.snapshots import restore_buffers, snapshot_buffers

    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Linear(5, 2), nn.BatchNorm1d(2))
    model.train()
    model(torch.randn(16, 3))  # statistics that differ per layer and per channel
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    saved = snapshot_buffers(model)
    model(torch.randn(16, 3) * 1e4)  # the forward of a step that will be skipped
    assert not torch.equal(model[3].running_var, before["3.running_var"])
    restore_buffers(model, saved)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items() if "running" in k)
    assert snapshot_buffers(nn.Linear(2, 2)) is None  # no float buffers: nothing to keep
    restore_buffers(nn.Linear(2, 2), None)
