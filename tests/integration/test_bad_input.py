"""Bad input: one line naming the field or file, exit code 2, no Ray started, no run directory written."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bad_inputs.bad_datasets import write_bad_datasets
from tests.helpers import ROOT, cli_cases

CASES = {  # file in tests/bad_inputs -> what the one-line error must name
    "malformed_yaml.yaml": "malformed YAML",
    "not_a_mapping.yaml": "expected a mapping",
    "duplicate_key.yaml": "duplicate key 'run'",
    "unknown_key.yaml": "model.colour: unknown key",
    "wrong_type_lr.yaml": "optimizer.lr:",
    "negative_lr.yaml": "optimizer.lr: Input should be greater than 0",
    "unknown_activation.yaml": "model.activation:",
    "unknown_optimizer.yaml": "optimizer.name:",
    "unknown_init.yaml": "model.init:",
    "unknown_clip_mode.yaml": "stability.clip.mode:",
    "missing_run.yaml": "run: Field required",
    "bad_run_name.yaml": "run.name:",
    "fp16_on_cpu.yaml": "scaling.amp: fp16 needs scaling.use_gpu",
    "resnet_flat_shape.yaml": "data.shape: model.kind resnet needs",
    "one_cycle_with_warmup.yaml": "schedule.warmup_epochs:",
    "fault_rank_out_of_range.yaml": "faults.0.rank:",
    "batch_size_one.yaml": "data.batch_size:",
    "missing_dataset.yaml": "data.train: ",
    "too_many_workers.yaml": "scaling.num_workers: 64 workers but this machine has",
    "shape_mismatch.yaml": "column 'image' has 64 values per row but data.shape [1, 4, 4] needs 16",
    "missing_column.yaml": "no column 'pixels' (named by data.features); it has image, label",
    "batch_larger_than_data.yaml": "data.batch_size: 4096 x 2 workers is more than",
    "unreadable_parquet.yaml": "not readable as Parquet",
    "data_csv.yaml": "tabular.csv: not readable as Parquet, which Keel reads; convert it once: python -c \"import pyarrow.csv as r, "
                     "pyarrow.parquet as p; p.write_table(r.read_csv(",
    "data_nan_features.yaml": "column 'image' has 1 rows with NaN features",
    "data_inf_features.yaml": "column 'image' has 1 rows with infinite features",
    "data_label_out_of_range.yaml": "column 'label' has 1 labels outside [0, 10)",
    "data_string_features.yaml": "column 'image' is string, expected numbers",
    "data_empty.yaml": "empty.parquet: no rows",
    "data_ragged.yaml": "ragged.parquet: rows of 'image' have different lengths",
    "data_tabular_width.yaml": "tabular.parquet: data.features' 2 columns give 2 values per row but data.shape [3] needs 3",
    "binary_file.yaml": "binary_file.yaml: not UTF-8 text",
    "latin1_text.yaml": "latin1_text.yaml: not UTF-8 text (byte 16)",
    "truncated.yaml": "truncated.yaml: line 4 malformed YAML",
    "custom_no_factory.yaml": "model.factory: model.kind custom needs 'package.module:function'",
    "custom_malformed_factory.yaml": "model.factory: expected 'package.module:function', got 'bad_models.wrong_classes'",
    "custom_import_error.yaml": "model.factory: cannot import 'no_such_user_module'",
    "custom_not_callable.yaml": "model.factory: bad_models.NOT_CALLABLE is not a function (int)",
    "custom_not_a_module.yaml": "model.factory: bad_models:returns_a_dict returned a dict, not a torch.nn.Module",
    "custom_wrong_output.yaml": "model.factory: bad_models:wrong_classes returned (2, 11) for a batch of shape (2, 1, 8, 8); expected logits of shape (2, 10)",
    "custom_forward_fails.yaml": "model.factory: bad_models:wrong_input's forward failed on a batch of shape (2, 1, 8, 8)",
    "custom_factory_raises.yaml": "raised TypeError: needs_depth() got an unexpected keyword argument 'width'",
    "factory_without_custom.yaml": "model.factory: only used with model.kind: custom (model.kind is resnet)",
    "init_from_missing.yaml": "init_from.checkpoint: ",
    "init_from_freeze_alone.yaml": "init_from.freeze: only used with init_from.checkpoint",
    "init_from_unquoted_prefix.yaml": "init_from.lr_multipliers: 1.0 is a number, not a name prefix: YAML reads an unquoted 1. as 1.0; quote it",
    "extra_val_missing.yaml": "data.extra_val.old: ",
}
@pytest.fixture(scope="module")
def corpus(tmp_path_factory, digits_dir) -> Path:
    """The bad specs with DATA pointing at a real digits set, plus a file that is not Parquet."""
    out = tmp_path_factory.mktemp("bad")
    for name in CASES:
        (out / name).write_bytes((ROOT / "tests/bad_inputs" / name).read_bytes().replace(b"DATA", str(digits_dir).encode()))
    (digits_dir / "notparquet.parquet").write_text("this is not parquet")
    write_bad_datasets(digits_dir)
    return out


def test_every_corpus_file_has_a_case():
    assert sorted(p.name for p in (ROOT / "tests/bad_inputs").glob("*.yaml")) == sorted(CASES)
    assert len([c for c in CASES if c.startswith("data_")]) + 3 >= 8  # + shape mismatch, missing column, unreadable


@pytest.fixture(scope="module", params=["run", "validate", "check"])
def outcomes(request, corpus, tmp_path_factory):
    command, work = request.param, tmp_path_factory.mktemp(f"bad-{request.param}")
    (work / "bad_models.py").write_bytes((ROOT / "tests/bad_inputs/bad_models.py").read_bytes())  # factories import from here
    argvs = [(case, [command, str(corpus / case)] + ([] if case == "missing_run.yaml" else [f"run.storage_path={work}/runs-{case}"]))
             for case in sorted(CASES)]
    return cli_cases(argvs, work), work


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_spec_exits_2_with_one_line_naming_the_field(case, outcomes):
    found, work = outcomes
    result = found["results"][case]
    assert result["rc"] == 2, result["stderr"]
    lines = result["stderr"].strip().splitlines()
    assert len(lines) == 1, result["stderr"]
    assert lines[0].startswith("keel: error: ") and CASES[case] in lines[0], lines[0]
    assert not found["ray_imported"]  # nothing started a Ray cluster, for any case
    assert not list(work.glob("runs-*"))  # no run directory half-written


def test_malformed_override_is_bad_input(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "validate", str(ROOT / "jobs/digits-resnet.yaml"), "optimizer.lr"],
                          capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and "expected dotted.key=value" in proc.stderr


def test_overrides_after_an_option_are_overrides_and_anything_else_there_is_refused(tmp_path):
    def keel(*args):
        return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    job = str(ROOT / "jobs/digits-resnet.yaml")
    proc = keel("run", "--print-config", job, "--quiet", "optimizer.lr=0.0123", "run.seed=7")  # as a user types it
    assert proc.returncode == 0, proc.stderr
    assert "lr: 0.0123" in proc.stdout and "seed: 7" in proc.stdout
    proc = keel("run", "--print-config", job, "--quiet", "--bogus")
    assert proc.returncode == 2 and "unrecognized arguments: --bogus" in proc.stderr


BAD_ARGUMENTS = {  # command-line arguments that cannot work, and what the one line says
    "rows": (["data", "make", "synthetic", "--rows", "0"], "--rows 0: needs at least 10"),
    "shape": (["data", "make", "synthetic", "--shape", "1,0,8"], "--shape '1,0,8': expected three positive sizes"),
    "classes": (["data", "make", "synthetic", "--classes", "1"], "--classes 1: needs at least 2"),
    "missing": (["data", "make", "tabular", "--missing", "1.5"], "--missing 1.5: a fraction of cells, in [0, 1)"),
    "length": (["data", "make", "sequence", "--length", "-3"], "--length -3: needs at least 2 time steps"),
    "make_out": (["data", "make", "digits", "--out", "/proc/keel-cannot-write-here"],
                 "--out /proc/keel-cannot-write-here: cannot write there"),
    "seeds": (["stress", "--seeds", "0"], "--seeds 0: needs at least 1"),
    "lstm_epochs": (["stress", "--scenarios", "long_lstm", "--lstm-epochs", "0"], "--lstm-epochs 0: needs at least 1"),
    "stress_out": (["stress", "--scenarios", "lr_spike", "--out", "/proc/keel-cannot-write-here"],
                   "--out /proc/keel-cannot-write-here: cannot write there"),
}


def test_arguments_that_cannot_work_are_one_line_exit_2_and_start_or_write_nothing(tmp_path):
    argvs = [(case, argv + ([] if "--out" in argv else ["--out", f"out-{case}"])) for case, (argv, _) in BAD_ARGUMENTS.items()]
    found = cli_cases(argvs, tmp_path)
    for case, (_, said) in BAD_ARGUMENTS.items():
        lines = found["results"][case]["stderr"].strip().splitlines()
        assert found["results"][case]["rc"] == 2 and len(lines) == 1 and said in lines[0], (case, found["results"][case])
    assert list(tmp_path.iterdir()) == [] and not found["ray_imported"]  # no output directory, no Ray


def test_a_cluster_address_where_nothing_answers_is_one_line_exit_2_before_any_run_directory(tmp_path):
    """ray.init retries such an address for a minute, printing GCS errors; `auto` with no cluster is a traceback."""
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = ["run", str(ROOT / "jobs/digits-resnet.yaml"), f"run.storage_path={tmp_path}/runs", f"scaling.address=127.0.0.1:{port}"]
    found = cli_cases([("refused", argv)], tmp_path)["results"]["refused"]
    lines = found["stderr"].strip().splitlines()
    assert found["rc"] == 2 and len(lines) == 1, found
    assert f"scaling.address: 127.0.0.1:{port}: no Ray cluster answers there (127.0.0.1:{port}: Connection refused" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_a_cluster_refusing_the_token_is_recognised_anywhere_in_the_error_chain():
    """ray.init raises ConnectionError, caused by a RuntimeError whose text holds Ray's AuthenticationError."""
    from orchestrator.ray_session import refused_token

    def chained() -> ConnectionError:
        try:
            try:
                raise RuntimeError("Failed to connect to GCS. ... RPC error: InvalidAuthToken: Authentication token is missing")
            except RuntimeError as inner:
                raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379") from inner
        except ConnectionError as outer:
            return outer
    assert refused_token(chained())
    assert not refused_token(ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379"))
