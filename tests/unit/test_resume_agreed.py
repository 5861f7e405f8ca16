"""Ranks resume from ONE checkpoint, chosen by rank 0, even when their views of the files differ (a failed
per-node download, a stale NFS cache). Two real gloo processes, the real DDP model; no Ray."""

import functools
import shutil

import torch
from torch.nn.parallel import DistributedDataParallel

from orchestrator.stability.distributed import broadcast_module_state
from orchestrator.train.checkpointing import read_payload, save_checkpoint, state_fingerprint
from orchestrator.train.components import build_components
from orchestrator.train.resume import restore_agreed
from tests.helpers import on_gloo_ranks
from tests.unit.test_resume_exact import STEPS, make, run_epoch

NAMES = ("checkpoint_000000", "checkpoint_000001")  # epoch 0, epoch 1


def _resume_on_rank(rank, views):
    spec, _ = make()
    comps = build_components(spec, STEPS, torch.device("cpu"), prepare_model=DistributedDataParallel)
    warnings = []
    view = views[rank]
    restored = restore_agreed([view / NAMES[1], view / NAMES[0]], comps, warnings.append)
    first = next(iter(comps.state.optimizer.state.values()))
    model = comps.state.model.module
    with torch.no_grad():  # the helper restore ends with: rank 0's weights and buffers win
        next(model.parameters()).add_(float(rank))
    broadcast_module_state(model)
    return {"epoch": restored.epoch, "fingerprints": restored.fingerprints, "copied": restored.copied_from_rank0,
            "exp_avg": first["exp_avg"].clone(), "warnings": warnings, "step": comps.state.step,
            "after_broadcast": state_fingerprint(model.state_dict())}


def _resume_each_case_on_rank(rank, cases):  # one pair of processes for every case (a spawn costs seconds)
    return {case: _resume_on_rank(rank, views) for case, views in cases.items()}


def test_every_rank_resumes_from_rank_0s_choice_with_identical_state(tmp_path):
    spec, comps = make()
    for epoch, name in enumerate(NAMES):  # two checkpoints with different weights
        run_epoch(comps, spec, epoch)
        save_checkpoint(tmp_path / "shared" / name, comps, epoch=epoch, spec_yaml=spec.to_yaml())
    expected = {e: state_fingerprint(read_payload(tmp_path / "shared" / n)["model"]) for e, n in enumerate(NAMES)}

    def views(corrupt_rank):  # each rank's own copy of the run; one rank's newest copy is truncated
        out = []
        for r in range(2):
            view = tmp_path / f"corrupt{corrupt_rank}-rank{r}"
            shutil.copytree(tmp_path / "shared", view)
            if r == corrupt_rank:
                state = view / NAMES[1] / "state.pt"
                state.write_bytes(state.read_bytes()[:1000])
            out.append(view)
        return out

    ranks = on_gloo_ranks(functools.partial(_resume_each_case_on_rank, cases={"rank 1 corrupt": views(1),
                                                                              "rank 0 corrupt": views(0)}), 2, tmp_path / "a")
    # rank 1 cannot read the newest: rank 0's choice (epoch 1) stands, rank 1 takes rank 0's copy
    r0, r1 = (r["rank 1 corrupt"] for r in ranks)
    assert r0["epoch"] == r1["epoch"] == 1
    assert r0["fingerprints"] == r1["fingerprints"] == [expected[1], expected[1]]
    assert torch.equal(r0["exp_avg"], r1["exp_avg"]) and r0["step"] == r1["step"] == 2 * STEPS
    assert len(r0["copied"]) == 1 and r0["copied"][0].startswith("rank 1:") and "state.pt" in r0["copied"][0]
    assert any("rank 1" in w and "rank 0's copy" in w for w in r0["warnings"])
    assert r0["after_broadcast"] == r1["after_broadcast"] == expected[1]

    # rank 0 cannot read the newest, rank 1 can: both go back to epoch 0, as rank 0 decided
    r0, r1 = (r["rank 0 corrupt"] for r in ranks)
    assert r0["epoch"] == r1["epoch"] == 0
    assert r0["fingerprints"] == r1["fingerprints"] == [expected[0], expected[0]]
    assert torch.equal(r0["exp_avg"], r1["exp_avg"]) and r0["copied"] == []
    assert any("falling back to an older one" in w for w in r0["warnings"])


def test_a_worker_group_resumes_from_the_newest_checkpoint_even_one_that_ray_train_did_not_report(tmp_path, monkeypatch):
    """A 1-worker run in process stores its checkpoints itself; Ray Train's own record of the run still names the
    older one its worker group reported. Resuming from Ray's trained an epoch twice."""
    import ray.train

    from orchestrator.spec import parse_spec
    from orchestrator.train.resume import latest_checkpoint

    spec = parse_spec({"model": {"kind": "mlp"}, "data": {"train": "t", "val": "v", "shape": [4], "num_classes": 2},
                       "run": {"name": "r", "storage_path": str(tmp_path)}})
    older, newer = (tmp_path / "r" / f"checkpoint_2026-11-24_08-0{m}-00.000000" for m in (1, 2))
    older.mkdir(parents=True)
    reported = ray.train.Checkpoint(str(older))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: reported)  # a fake of Ray Train's record, nothing else
    assert latest_checkpoint(spec) is reported  # the newest there is: Ray Train's own
    newer.mkdir()  # then a run in process stored a newer one
    assert latest_checkpoint(spec).path == str(newer)
    assert latest_checkpoint(spec, in_process=True).path == str(newer)
