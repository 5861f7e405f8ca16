"""The data a job reads, as preflight plans it from real Parquet files (no cluster): class labels as pandas
writes them, and tabular columns standardised under the defaults."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.data.generators import make_tabular
from orchestrator.data.preprocess import apply_preprocess
from orchestrator.data.scan import describe, scan_split
from orchestrator.errors import BadInput
from orchestrator.spec import parse_spec
from orchestrator.train.planning import preflight


def test_float_labels_train_when_whole_and_a_fractional_one_is_named_or_dropped(tmp_path):
    """A label column pandas wrote as float64 (0.0, 1.0, ...) was refused as 'double, expected integer class
    labels'. Whole values are class labels; 1.5 is not, and a missing one never was."""
    x = np.random.default_rng(0).random((64, 2))
    labels = (np.arange(64) % 2).astype(np.float64)
    pq.write_table(pa.table({"a": x[:, 0], "b": x[:, 1], "label": labels}), tmp_path / "whole.parquet")
    labels[[3, 7]] = [1.5, np.nan]
    pq.write_table(pa.table({"a": x[:, 0], "b": x[:, 1], "label": labels}), tmp_path / "gaps.parquet")

    def spec(train: str, **data):
        return parse_spec({"model": {"kind": "mlp"}, "run": {"name": "f", "storage_path": str(tmp_path / "runs")},
                           "data": {"train": str(tmp_path / train), "val": str(tmp_path / "whole.parquet"), "features": ["a", "b"],
                                    "shape": [2], "num_classes": 2, "batch_size": 8, **data}})
    assert preflight(spec("whole.parquet")).train_rows == 64
    with pytest.raises(BadInput, match=r"gaps.parquet: column 'label' has 1 labels that are not whole numbers; class labels are 0..num_classes-1"):
        preflight(spec("gaps.parquet"))
    assert preflight(spec("gaps.parquet", on_bad_rows="drop")).dropped_rows["train"] == 2  # 1.5 and the missing one
    inspected = dict(describe(scan_split(str(tmp_path / "gaps.parquet"), "path", ["a", "b"], "label")))  # keel data inspect
    assert inspected["rows without a class label"] == "2 (1 not whole numbers)" and inspected["label range"] == "0 .. 1"


def test_a_tabular_job_on_defaults_trains_on_standardised_columns(tmp_path):
    """Columns in unrelated units (keel data make tabular: scales from 1e-2 to 1e3) reach the network at one
    scale, with the training split's statistics, under the defaults a user gets."""
    make_tabular(tmp_path, rows=600, features=4, missing=0.0)
    spec = parse_spec({"model": {"kind": "mlp"}, "run": {"name": "tab", "storage_path": str(tmp_path / "runs")},
                       "data": {"train": str(tmp_path / "train.parquet"), "val": str(tmp_path / "val.parquet"),
                                "features": "features", "shape": [4], "num_classes": 3}})
    raw = pq.read_table(tmp_path / "train.parquet").column("features").combine_chunks().flatten().to_numpy().reshape(-1, 4)
    assert raw.std(axis=0).max() / raw.std(axis=0).min() > 100  # the case: columns far apart in scale
    x, _, _ = apply_preprocess(raw, np.zeros(len(raw), dtype=np.int64), preflight(spec).preprocess)
    assert np.allclose(x.mean(axis=0), 0, atol=1e-3) and np.allclose(x.std(axis=0), 1, atol=1e-3)
