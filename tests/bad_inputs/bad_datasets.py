"""Bad datasets for the bad-input corpus, written next to a good digits set (DATA in the specs)."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq


def _images(x):
    return pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(x, dtype=np.float32).ravel()), 64)


def write_bad_datasets(out: Path) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.random((200, 64)), np.arange(200) % 10
    nan_x = x.copy()
    nan_x[5, 3] = np.nan
    inf_x = x.copy()
    inf_x[7, 0] = np.inf
    pq.write_table(pa.table({"image": _images(nan_x), "label": y}), out / "nan_features.parquet")
    pq.write_table(pa.table({"image": _images(inf_x), "label": y}), out / "inf_features.parquet")
    pq.write_table(pa.table({"image": _images(x), "label": np.where(np.arange(200) == 3, 12, y)}), out / "label_out_of_range.parquet")
    pq.write_table(pa.table({"image": pa.array([str(v) for v in range(200)]), "label": y}), out / "string_features.parquet")
    pq.write_table(pa.table({"image": _images(x[:0]), "label": y[:0]}), out / "empty.parquet")
    ragged = pa.array([list(map(float, row[: 64 if i % 2 else 60])) for i, row in enumerate(x)], type=pa.list_(pa.float32()))
    pq.write_table(pa.table({"image": ragged, "label": y}), out / "ragged.parquet")
    pq.write_table(pa.table({"a": x[:, 0], "b": x[:, 1], "label": y}), out / "tabular.parquet")
    pa.csv.write_csv(pa.table({"a": x[:, 0], "b": x[:, 1], "label": y}), out / "tabular.csv")  # a table as text, not Parquet
