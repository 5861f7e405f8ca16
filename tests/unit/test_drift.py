"""Drift between a checkpoint's training data and new data: PSI over the reference's deciles, per feature
or (wide inputs) per channel."""

import numpy as np
import pytest

from orchestrator.data import drift


def test_the_same_distribution_shows_no_shift_and_a_moved_feature_is_named_first():
    rng = np.random.default_rng(0)
    old = rng.normal(size=(4000, 6))
    ref = drift.reference(old, [6])
    same = drift.compare(ref, rng.normal(size=(4000, 6)), [6])
    assert same["major"] == 0 and same["moderate"] == 0 and same["max_psi"] < 0.05
    new = rng.normal(size=(4000, 6))
    new[:, 4] += 1.0  # one feature moves by one standard deviation
    moved = drift.compare(ref, new, [6])
    assert moved["major"] == 1 and moved["most_shifted"][0]["feature"] == 4
    assert moved["most_shifted"][0]["mean_shift_std"] == pytest.approx(1.0, abs=0.1)
    line = drift.summary_line(moved)
    assert line.startswith("drift: major shift") and "feature 4 (PSI" in line and "mean +1.0 sd" in line


def test_wide_inputs_are_compared_per_channel_and_a_mismatch_is_said_not_guessed():
    rng = np.random.default_rng(1)
    shape = [3, 32, 32]
    old = rng.uniform(size=(300, 3 * 32 * 32))
    ref = drift.reference(old, shape)
    assert ref["level"] == "channel" and len(ref["edges"]) == 3
    new = rng.uniform(size=(300, 3 * 32 * 32))
    new[:, 1024:2048] = new[:, 1024:2048] * 0.6 + 0.25  # channel 1 fainter, on grey
    report = drift.compare(ref, new, shape)
    assert report["most_shifted"][0]["channel"] == 1 and report["major"] == 1
    other = drift.compare(ref, rng.uniform(size=(300, 64)), [64])
    assert other == {"comparable": False, "reason": "the reference has 3 channels, the new data 64 features"}
    assert "not compared" in drift.summary_line(other)


def test_tabular_columns_are_named_in_the_report_and_the_line():
    """A fine-tuning job on named columns (data.features: a list) reads 'income', not 'feature 1'."""
    rng = np.random.default_rng(2)
    ref = drift.reference(rng.normal(size=(3000, 3)), [3])
    new = rng.normal(size=(3000, 3))
    new[:, 1] += 2.0
    names = ["age", "income", "tenure"]
    moved = drift.compare(ref, new, [3], names)
    assert moved["most_shifted"][0] == {**moved["most_shifted"][0], "feature": 1, "name": "income"}
    assert "most shifted: income (PSI" in drift.summary_line(moved) and "feature 1" not in drift.summary_line(moved)
    # one list column (the spec's data.features: 'x') has no per-feature names: indices, as before
    assert "name" not in drift.compare(ref, new, [3], ["x"])["most_shifted"][0]


def test_a_fine_tuning_plan_names_the_job_s_own_feature_columns(tmp_path):
    """The run's drift (scan_data, as `keel validate` and `keel run` plan it) on Parquet with named columns."""
    import pandas as pd

    from orchestrator.spec import JobSpec
    from orchestrator.train.planning import scan_data

    rng = np.random.default_rng(3)
    old = rng.normal(size=(2000, 3))
    new = rng.normal(size=(2000, 3))
    new[:, 2] *= 4.0  # 'tenure' rescaled
    for split in ("train", "val"):
        frame = pd.DataFrame(new.astype("float32"), columns=["age", "income", "tenure"])
        frame["label"] = rng.integers(0, 2, len(frame))
        frame.to_parquet(tmp_path / f"{split}.parquet")
    spec = JobSpec.model_validate({
        "model": {"kind": "mlp"}, "run": {"name": "tabular"},
        "data": {"train": str(tmp_path / "train.parquet"), "val": str(tmp_path / "val.parquet"),
                 "features": ["age", "income", "tenure"], "shape": [3], "num_classes": 2}})
    plan = scan_data(spec, generate=False, against=drift.reference(old, [3]))
    assert plan.drift["most_shifted"][0]["name"] == "tenure"
