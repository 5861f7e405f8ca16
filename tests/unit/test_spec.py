import re

import pytest
import yaml

from orchestrator.errors import BadInput
from orchestrator.spec import JobSpec, apply_overrides, load_spec, parse_spec
from orchestrator.spec_text import field_reference
from tests.helpers import ROOT

MINIMAL = {"data": {"train": "t", "val": "v", "shape": [1, 8, 8], "num_classes": 10}, "run": {"name": "x"}}


def test_every_job_and_sweep_in_jobs_folder_loads():
    from orchestrator.sweep.spec import is_sweep_file, load_sweep

    paths = sorted((ROOT / "jobs").glob("*.yaml"))
    assert len(paths) >= 4
    for path in paths:
        if is_sweep_file(path):
            assert load_sweep(path)[0].search
        else:
            assert isinstance(load_spec(path), JobSpec)


def test_every_shipped_job_writes_its_data_on_first_use():
    """A fresh clone runs any job in jobs/ as it stands: the missing Parquet is generated, not an exit 2."""
    from orchestrator.sweep.spec import is_sweep_file

    jobs = [p for p in sorted((ROOT / "jobs").glob("*.yaml")) if not is_sweep_file(p)]
    assert [p.name for p in jobs if load_spec(p).data.generate is None] == []


def test_overrides_are_parsed_as_yaml_values(tmp_path):
    path = tmp_path / "j.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    spec = load_spec(path, ["optimizer.lr=1e-3", "stability.clip.mode=value", "model.channels=[8, 16]",
                            "stability.early_stopping.enabled=true"])
    assert spec.optimizer.lr == 1e-3 and spec.stability.clip.mode == "value"
    assert spec.model.channels == [8, 16] and spec.stability.early_stopping.enabled is True


def test_overrides_are_typed_by_the_field_they_set(tmp_path):
    """YAML 1.1 turns off/yes/2024-01-01 into bool/date; a string field keeps what was typed."""
    path = tmp_path / "j.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    assert load_spec(path, ["run.name=off"]).run.name == "off"
    assert load_spec(path, ["run.name=2024-01-01"]).run.name == "2024-01-01"
    assert load_spec(path, ["run.storage_path=yes"]).run.storage_path == "yes"
    assert load_spec(path, ["data.label=no"]).data.label == "no"
    assert load_spec(path, ["data.features=[a, b]"]).data.features == ["a", "b"]  # str or list: a list stays a list
    assert load_spec(path, ["data.features=on"]).data.features == "on"
    assert load_spec(path, ["scaling.address=null"]).scaling.address is None
    assert load_spec(path, ["model.batch_norm=off"]).model.batch_norm is False  # a bool field still reads YAML


def test_overrides_index_and_append_lists(tmp_path):
    path = tmp_path / "j.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "model": {"hidden": [128, 128]}, "faults": [{"kind": "nan_batch", "at_step": 1}]}))
    spec = load_spec(path, ["faults.0.at_step=3", "faults.1={kind: lr_spike, at_step: 9}", "faults.1.factor=5",
                            "model.hidden.0=7"])
    assert [(f.kind, f.at_step) for f in spec.faults] == [("nan_batch", 3), ("lr_spike", 9)] and spec.faults[1].factor == 5
    assert spec.model.hidden == [7, 128]
    with pytest.raises(BadInput, match=r"faults has 1 item\(s\); use an index from 0 to 1"):
        load_spec(path, ["faults.5.at_step=3"])
    with pytest.raises(BadInput, match=r"faults\.0\.colour: unknown key"):
        load_spec(path, ["faults.0.colour=red"])


def test_override_of_unknown_field_is_rejected_with_its_path(tmp_path):
    path = tmp_path / "j.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    with pytest.raises(BadInput, match=r"optimizer\.learning_rate: unknown key"):
        load_spec(path, ["optimizer.learning_rate=0.1"])


@pytest.mark.parametrize("override", ["novalue", "=3", "a..b=1"])
def test_malformed_override(override):
    with pytest.raises(BadInput, match="expected dotted.key=value"):
        apply_overrides({}, [override])


def test_defaults_are_not_shared_between_specs():
    a, b = parse_spec(MINIMAL), parse_spec(MINIMAL)
    a.stability.clip.max_norm = 5.0
    a.model.channels.append(128)
    assert b.stability.clip.max_norm == 1.0 and b.model.channels == [32, 64]


def test_resolved_spec_round_trips_through_yaml():
    spec = parse_spec({**MINIMAL, "optimizer": {"name": "adamw", "lr": 3e-4}})
    assert parse_spec(yaml.safe_load(spec.to_yaml())) == spec


def test_every_field_is_documented():
    rows = field_reference()
    assert len(rows) > 60
    undocumented = [name for name, _, text in rows if not text.strip()]
    assert undocumented == []


@pytest.mark.parametrize("patch, message", [
    ({"scaling": {"amp": "fp16"}}, "scaling.amp: fp16 needs"),
    ({"model": {"kind": "cnn"}, "data": {**MINIMAL["data"], "shape": [64]}}, "data.shape"),
    ({"schedule": {"kind": "one_cycle", "warmup_epochs": 2}}, "schedule.warmup_epochs"),
    ({"faults": [{"kind": "nan_batch", "at_step": 1, "rank": 2}]}, "faults.0.rank"),
    ({"model": {"dropout": 1.5}}, "model.dropout"),
    ({"optimizer": {"momentum": 1.0}}, "optimizer.momentum"),
    ({"scaling": {"num_workers": [3, 2]}}, "scaling.num_workers: [3, 2]; give a count, or [min, max]"),
    ({"scaling": {"num_workers": [1, 2, 3]}}, "scaling.num_workers: [1, 2, 3]"),
    ({"scaling": {"num_workers": 0}}, "scaling.num_workers: 0; at least 1"),
])
def test_invalid_combinations_name_the_field(patch, message):
    with pytest.raises(BadInput, match=re.escape(message)):
        parse_spec({**MINIMAL, **patch}, "job.yaml")


def test_an_elastic_worker_range_from_yaml_or_an_override():
    spec = parse_spec({**MINIMAL, "scaling": {"num_workers": [1, 4]}}, "job.yaml")
    assert (spec.scaling.min_workers, spec.scaling.max_workers, spec.scaling.elastic) == (1, 4, True)
    fixed = parse_spec(apply_overrides({**MINIMAL}, ["scaling.num_workers=3"]), "job.yaml").scaling
    assert (fixed.min_workers, fixed.max_workers, fixed.elastic) == (3, 3, False)
    ranged = parse_spec(apply_overrides({**MINIMAL}, ["scaling.num_workers=[2,3]"]), "job.yaml").scaling
    assert ranged.num_workers == [2, 3]


def test_error_is_one_line_with_source():
    with pytest.raises(BadInput) as info:
        parse_spec({**MINIMAL, "optimizer": {"lr": -1, "name": "nope"}}, "job.yaml")
    text = str(info.value)
    assert "\n" not in text and text.startswith("job.yaml: ") and text.endswith("(+1 more: optimizer.lr)"), text


def test_warmup_auto_is_a_quarter_of_the_run_for_a_transformer_or_an_lstm_and_one_epoch_otherwise():
    sequence = {**MINIMAL, "data": {**MINIMAL["data"], "shape": [12, 16]}}
    assert parse_spec(MINIMAL).schedule.warmup_epochs == 1.0                                      # a ResNet
    short = {**MINIMAL, "run": {"name": "x", "epochs": 2}}
    assert parse_spec(short).schedule.warmup_epochs == 0.5                                        # a quarter of a short run
    assert parse_spec({**sequence, "model": {"kind": "transformer"}}).schedule.warmup_epochs == 2.5  # of 10 epochs
    four = {**sequence, "model": {"kind": "transformer"}, "run": {"name": "x", "epochs": 4}}
    assert parse_spec(four).schedule.warmup_epochs == 1.0
    assert parse_spec({**sequence, "model": {"kind": "lstm"}}).schedule.warmup_epochs == 2.5
    assert parse_spec({**MINIMAL, "model": {"kind": "mlp"}}).schedule.warmup_epochs == 1.0
    written = {**sequence, "model": {"kind": "transformer"}, "schedule": {"warmup_epochs": 0}}
    assert parse_spec(written).schedule.warmup_epochs == 0.0                                      # what is written wins
    one_cycle = {**sequence, "model": {"kind": "transformer"}, "schedule": {"kind": "one_cycle"}}
    assert parse_spec(one_cycle).schedule.warmup_epochs == 0.0                                    # it has its own
    assert parse_spec({**MINIMAL, "schedule": {"kind": "one_cycle"}}).schedule.warmup_epochs == 0.0
    resolved = parse_spec({**sequence, "model": {"kind": "transformer"}})
    assert yaml.safe_load(resolved.to_yaml())["schedule"]["warmup_epochs"] == 2.5                 # config.yaml says it
    with pytest.raises(BadInput, match=r"schedule.warmup_epochs: expected a number of epochs >= 0, or auto \(got 'soon'\)"):
        parse_spec({**MINIMAL, "schedule": {"warmup_epochs": "soon"}})


def test_standardize_auto_is_per_feature_for_tabular_rows_into_keels_mlp_and_none_for_images_sequences_and_custom_models():
    tabular = {**MINIMAL, "model": {"kind": "mlp"}, "data": {**MINIMAL["data"], "features": ["a", "b", "c"], "shape": [3]}}
    assert parse_spec(tabular).data.preprocess.standardize == "per_feature"
    one_column = {**tabular, "data": {**tabular["data"], "features": "row"}}  # a fixed-size list column of tabular values
    assert parse_spec(one_column).data.preprocess.standardize == "per_feature"
    assert parse_spec(MINIMAL).data.preprocess.standardize == "none"                              # an image
    assert parse_spec({**MINIMAL, "model": {"kind": "lstm"}, "data": {**MINIMAL["data"], "shape": [12, 1]}}).data.preprocess.standardize == "none"
    custom = {**tabular, "model": {"kind": "custom", "factory": "nets:tabular"}}  # its own inputs, as with its own init
    assert parse_spec(custom).data.preprocess.standardize == "none"
    written = {**tabular, "data": {**tabular["data"], "preprocess": {"standardize": "none"}}}
    assert parse_spec(written).data.preprocess.standardize == "none"                             # what is written wins
    assert yaml.safe_load(parse_spec(tabular).to_yaml())["data"]["preprocess"]["standardize"] == "per_feature"


@pytest.mark.parametrize("override, said", [
    ("stability.clip.max_nrom=2", "stability.clip.max_nrom: unknown key (did you mean max_norm?)"),
    ("optimzer.lr=0.1", "optimzer: unknown key (did you mean optimizer?)"),
    ("faults=[{kind: nan_batch, at_step: 3, rnak: 1}]", "faults.0.rnak: unknown key (did you mean rank?)"),  # inside a list
    ("data.augment.horizontal_flip=0.5", "data.augment.horizontal_flip: unknown key"),  # nothing close: no guess
])
def test_an_unknown_key_names_the_closest_known_one(override, said):
    with pytest.raises(BadInput) as info:
        parse_spec(apply_overrides({**MINIMAL}, [override]), "job.yaml")
    assert str(info.value) == f"job.yaml: {said}"


def test_a_path_written_from_the_job_files_directory_is_pointed_out_when_keel_runs_elsewhere(tmp_path, monkeypatch, capsys):
    from orchestrator import cli

    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    for split in ("train", "val"):
        (project / "data" / f"{split}.parquet").write_bytes(b"")
    (project / "job.yaml").write_text(yaml.safe_dump({
        "model": {"kind": "mlp"}, "run": {"name": "r"},
        "data": {"train": "data/train.parquet", "val": "data/val.parquet", "shape": [4], "num_classes": 2}}))
    monkeypatch.chdir(tmp_path)  # one level up, as `keel run project/job.yaml`
    assert cli.main(["validate", "project/job.yaml"]) == 2
    err = capsys.readouterr().err
    assert f"data.train: {tmp_path}/data/train.parquet: no such file or directory" in err
    assert f"data/train.parquet is in the job file's directory: run keel from {project}" in " ".join(err.split()), err
    assert cli.main(["validate", "project/job.yaml", "data.train=elsewhere.parquet"]) == 2  # nowhere: no hint
    assert "job file's directory" not in capsys.readouterr().err
