"""Fine-tuning from a checkpoint (init_from), on small real models and checkpoints written by Keel's own
save function: what loads, what is re-initialised, frozen or slowed, and what is refused before Ray."""

import pytest
import torch
import yaml

from orchestrator.errors import BadInput
from orchestrator.models import build_model
from orchestrator.spec import parse_spec
from orchestrator.train.components import build_components
from orchestrator.train.checkpointing import save_checkpoint
from orchestrator.train.warm_start import check_warm_start, checkpoint_dir, weights_to_load


def job(classes=10, **init_from):
    return parse_spec({"model": {"kind": "resnet", "channels": [8, 16], "blocks_per_stage": 1},
                       "data": {"train": "t.parquet", "val": "v.parquet", "shape": [1, 8, 8], "num_classes": classes},
                       "run": {"name": "ft"}, **({"init_from": init_from} if init_from else {})})


@pytest.fixture
def run_dir(tmp_path):
    """A run directory with two checkpoints of a 10-class model, written by save_checkpoint."""
    comps = build_components(job(), 4, torch.device("cpu"))
    for epoch in (0, 1):
        with torch.no_grad():
            for p in comps.state.model.parameters():
                p.add_(1.0)  # each checkpoint distinct
        save_checkpoint(tmp_path / "run" / f"checkpoint_00{epoch}", comps, epoch=epoch, spec_yaml=yaml.safe_dump({}))
    return tmp_path / "run", comps.state.model


def test_a_run_directory_stands_for_its_newest_checkpoint(run_dir):
    run, _ = run_dir
    with checkpoint_dir(str(run)) as newest, checkpoint_dir(str(run / "checkpoint_000")) as named:
        assert newest.endswith("checkpoint_001") and named.endswith("checkpoint_000")


def test_same_classes_load_everything_and_a_new_class_count_resets_only_the_classifier(run_dir):
    run, trained = run_dir
    saved = trained.state_dict()
    weights, reset = weights_to_load(build_model(job().model, job().data), saved, "auto")
    assert reset == [] and set(weights) == set(saved)
    five = job(classes=5)
    weights, reset = weights_to_load(build_model(five.model, five.data), saved, "auto")
    assert reset == ["head.3.bias", "head.3.weight"] and set(weights) == set(saved) - set(reset)
    with pytest.raises(ValueError, match=r"init_from.reset_head: no, but the classifier's shape differs \(head.3.bias \(10,\) -> \(5,\)"):
        weights_to_load(build_model(five.model, five.data), saved, "no")


def test_what_cannot_fit_is_refused_in_one_line_naming_the_field(run_dir, tmp_path):
    run, _ = run_dir
    wider = parse_spec({**job(checkpoint=str(run)).model_dump(), "model": {"kind": "resnet", "channels": [16, 16], "blocks_per_stage": 1}})
    with pytest.raises(BadInput, match=r"init_from.checkpoint: stem.0.weight is \(8, 1, 3, 3\) in the checkpoint, \(16, 1, 3, 3\)"):
        check_warm_start(wider, build_model(wider.model, wider.data))
    spec = job(checkpoint=str(run), freeze=["stemm."])
    with pytest.raises(BadInput, match=r"init_from.freeze: 'stemm.' matches no parameter \(names start with blocks., head., stem.\)"):
        check_warm_start(spec, build_model(spec.model, spec.data))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="init_from.checkpoint: .*empty: not a Keel checkpoint"):
        check_warm_start(job(checkpoint=str(tmp_path / "empty")), build_model(job().model, job().data))
    newest = run / "checkpoint_001" / "state.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.raises(BadInput, match="init_from.checkpoint: .*state.pt: .*truncated"):
        check_warm_start(job(checkpoint=str(run)), build_model(job().model, job().data))


def test_a_transformer_checkpoint_from_before_the_qk_norm_default_names_the_setting_that_loads_it():
    tokens = {"train": "t.parquet", "val": "v.parquet", "shape": [6, 5], "num_classes": 2}
    spec = lambda **model: parse_spec({"model": {"kind": "transformer", "width": 16, "heads": 4, **model}, "data": tokens, "run": {"name": "ft"}})
    without = build_model(spec(qk_norm=False).model, spec().data).state_dict()
    with pytest.raises(ValueError, match=r"has no blocks.0.attention.q_norm.weight \(trained without QK-layernorm\? set model.qk_norm: false\)"):
        weights_to_load(build_model(spec().model, spec().data), without, "auto")
    weights, reset = weights_to_load(build_model(spec(qk_norm=False).model, spec().data), without, "auto")
    assert set(weights) == set(without) and reset == []
    with pytest.raises(ValueError, match=r"has blocks.0.attention.k_norm.bias, which this model does not \(trained with QK-layernorm\? set model.qk_norm: true\)"):
        weights_to_load(build_model(spec(qk_norm=False).model, spec().data), build_model(spec().model, spec().data).state_dict(), "auto")


def test_frozen_prefixes_get_no_gradient_and_multiplied_ones_their_own_lr(run_dir):
    run, _ = run_dir
    spec = job(checkpoint=str(run), freeze=["stem."], lr_multipliers={"blocks.": 0.1})
    comps = build_components(spec, 4, torch.device("cpu"))
    named = dict(comps.state.model.named_parameters())
    assert not any(p.requires_grad for n, p in named.items() if n.startswith("stem."))
    in_optimizer = {id(p) for g in comps.state.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_optimizer for n, p in named.items() if n.startswith("stem."))
    lr_of = {id(p): g["lr"] for g in comps.state.optimizer.param_groups for p in g["params"]}
    base = comps.state.optimizer.param_groups[0]["lr"]
    assert lr_of[id(named["blocks.0.conv1.weight"])] == pytest.approx(0.1 * base)
    assert lr_of[id(named["head.3.weight"])] == pytest.approx(base)
    for _ in range(3):  # the schedule moves every group and keeps their ratio (stepped after the optimizer, as in training)
        comps.state.optimizer.step()
        comps.schedule.step()
    now = {id(p): g["lr"] for g in comps.state.optimizer.param_groups for p in g["params"]}
    assert now[id(named["head.3.weight"])] != base
    assert now[id(named["blocks.0.conv1.weight"])] == pytest.approx(0.1 * now[id(named["head.3.weight"])])
