"""`keel data make`: built-in datasets written as Parquet (no downloads; digits ships with scikit-learn)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def _tensor_column(x: np.ndarray) -> pa.FixedSizeListArray:
    """Rows of a 2-D float array as a fixed-size list column (Ray Data yields it as a (B, D) tensor)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])


def write_split(path: Path, features: np.ndarray, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"image": _tensor_column(features.reshape(len(features), -1)), "label": pa.array(labels.astype(np.int64))})
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)  # atomic: a reader never sees half a file


def make_digits(out: str | Path, val_fraction: float = 0.2, seed: int = 0) -> tuple[Path, Path]:
    """scikit-learn's 8x8 digits (1,797 images), pixels scaled to [0, 1], stratified train/val split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)
    x_tr, x_va, y_tr, y_va = train_test_split(x, digits.target, test_size=val_fraction, random_state=seed, stratify=digits.target)
    out = Path(out)
    write_split(out / "train.parquet", x_tr, y_tr)
    write_split(out / "val.parquet", x_va, y_va)
    return out / "train.parquet", out / "val.parquet"


GENERATORS = {"digits": make_digits}
