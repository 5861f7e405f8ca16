"""Decisions that change control flow are agreed: a signal that ONE rank sees (and that leaves every
loss and gradient finite, so nothing else can carry it across) must make both ranks act together.
Two real gloo processes; no Ray."""

import pytest
import torch

from orchestrator.stability.early_stopping import EarlyStopping
from orchestrator.stability.nonfinite import NonFiniteGuard
from orchestrator.train.hooks import Safeguards, StepState
from orchestrator.train.loop import agree_step
from tests.helpers import on_gloo_ranks

WORLD = 2


def _worker(rank):
    model = torch.nn.Linear(2, 2)
    state = StepState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), device=torch.device("cpu"), rank=rank)
    guards = Safeguards([NonFiniteGuard(max_consecutive_skips=2)])
    decisions = []
    for step in range(3):  # rank 1 alone flags its input batch as out of scale at steps 1 and 2
        state.begin_step()
        state.step = step
        losses = torch.tensor([1.0, 1.0, 1.0, 1.0 + 4.0 * rank])  # rank 1: one sample far above the rest
        state.loss, state.grad_norm = losses.mean(), torch.tensor(0.5)
        state.batch_outlier = torch.tensor(1.0 if rank == 1 and step >= 1 else 0.0)
        agree_step(state, losses)
        guards.decide(state)
        decisions.append((state.skip, state.stop_reason is not None, state.global_loss, state.global_loss_typical))
    stopper = EarlyStopping("val_loss", "min", patience=5)
    stop_state = StepState(model=model, optimizer=state.optimizer, device=torch.device("cpu"), rank=rank)
    stopper.on_epoch_end(stop_state, {"val_loss": float("nan") if rank == 1 else 1.0})  # rank 1 alone sees NaN
    return {"decisions": decisions, "early_stop": stop_state.stop_reason}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return on_gloo_ranks(_worker, WORLD, tmp_path_factory.mktemp("agree"))


@pytest.mark.timeout(120)
def test_an_outlier_batch_on_one_rank_skips_and_then_stops_every_rank(ranks):
    # losses: the all-reduced mean (rank 0 1.0, rank 1 2.0), and without each rank's worst sample (all 1.0)
    expected = [(False, False, 1.5, 1.0), (True, False, 1.5, 1.0), (True, True, 1.5, 1.0)]
    assert ranks[0]["decisions"] == expected and ranks[1]["decisions"] == expected


@pytest.mark.timeout(120)
def test_a_stop_asked_by_one_rank_stops_every_rank(ranks):
    assert ranks[1]["early_stop"].diverged and str(ranks[1]["early_stop"]) == "diverged: metric is nan"
    assert ranks[0]["early_stop"].kind == "early_stop" and str(ranks[0]["early_stop"]) == "early stop: another rank asked to stop"
