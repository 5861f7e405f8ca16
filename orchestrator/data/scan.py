"""One streaming pass over a Parquet split with pyarrow, on the driver, before anything starts.

It yields what validation, preprocessing and `keel data inspect` need: rows, per-column
NaN/Inf counts, label range and class balance, and per-feature sums for standardisation
(NaN-ignoring). Memory stays bounded (record batches); a sample of rows is kept for medians.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from orchestrator.errors import BadInput

MEDIAN_SAMPLE_ROWS = 50_000


def feature_matrix(table_or_batch, columns: list[str]) -> np.ndarray:
    """(N, D) float64 from one fixed-size-list column or several scalar columns (nulls become NaN)."""
    parts = []
    for name in columns:
        col = table_or_batch.column(name)
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        if pa.types.is_fixed_size_list(col.type) or pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            if pa.types.is_fixed_size_list(col.type):
                width = col.type.list_size
            else:  # variable-length lists must still be rectangular
                lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
                width = int(lengths[0]) if len(lengths) else 0
                if len(lengths) and (lengths != width).any():
                    raise BadInput(f"rows of {name!r} have different lengths ({width} and "
                                   f"{int(lengths[lengths != width][0])}): every row needs data.shape's size")
            values = col.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
            parts.append(values.reshape(len(col), width))
        else:
            parts.append(col.to_numpy(zero_copy_only=False).astype(np.float64).reshape(-1, 1))
    return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]


@dataclass
class SplitScan:
    path: str
    rows: int = 0
    width: int = 0
    nan: dict = field(default_factory=dict)        # column -> rows with a NaN (or null) feature
    inf: dict = field(default_factory=dict)        # column -> rows with an infinite feature
    bad_label_rows: int = 0                        # label missing or outside [0, num_classes), or not whole
    fractional_label_rows: int = 0                 # float labels that are not whole numbers (1.5)
    label_min: Optional[int] = None
    label_max: Optional[int] = None
    class_counts: dict = field(default_factory=dict)
    sum: Optional[np.ndarray] = None               # per feature, NaN/Inf ignored
    sumsq: Optional[np.ndarray] = None
    count: Optional[np.ndarray] = None
    sample: list = field(default_factory=list)     # rows kept for medians
    bad_rows: int = 0                              # rows with any NaN/Inf feature or a bad label
    bad_rows_imputed: int = 0                      # the same once NaN are imputed (Inf or bad label)
    extra: dict = field(default_factory=dict)      # extra columns read whole (e.g. the curriculum score)

    @property
    def bad_feature_rows(self) -> int:
        return sum(self.nan.values()) + sum(self.inf.values())


def open_dataset(path: str, field_name: str) -> pq.ParquetDataset:
    if "://" not in path and not Path(path).exists():
        raise BadInput(f"{field_name}: {path}: no such file or directory")
    try:
        return pq.ParquetDataset(path)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        reader = TEXT_TABLE_READERS.get(Path(path).suffix.lower())
        if reader:  # a table in a text format: say how to write it as Parquet, once
            raise BadInput(f"{field_name}: {path}: not readable as Parquet, which Keel reads; convert it once: python -c "
                           f"\"import pyarrow.{reader} as r, pyarrow.parquet as p; "
                           f"p.write_table(r.read_{reader}('{path}'), '{Path(path).with_suffix('.parquet')}')\"") from None
        raise BadInput(f"{field_name}: {path}: not readable as Parquet ({str(exc).splitlines()[0]})") from None


TEXT_TABLE_READERS = {".csv": "csv", ".jsonl": "json"}  # pyarrow's readers of a table written as text


def scan_split(path: str, field_name: str, features: list[str], label: str, num_classes: Optional[int] = None,
               shape: Optional[list[int]] = None, extra_columns: list[str] = (), scorer=None,
               asked_by: Optional[dict[str, str]] = None) -> SplitScan:
    """`scorer(x_raw, y) -> scores`, if given, fills scan.extra["score"] batch by batch. `asked_by` maps a column
    to the setting that names it (data.features, ...), for the message when the file lacks it."""
    dataset = open_dataset(path, field_name)
    names = dataset.schema.names
    for column in [*features, label, *extra_columns]:
        if column not in names:
            named = f" (named by {asked_by[column]})" if asked_by and column in asked_by else ""
            raise BadInput(f"{field_name}: {path}: no column {column!r}{named}; it has {', '.join(names)}")
    for column in features:
        t = dataset.schema.field(column).type
        inner = t.value_type if pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t) else t
        if not (pa.types.is_floating(inner) or pa.types.is_integer(inner)):
            raise BadInput(f"{path}: column {column!r} is {t}, expected numbers or a list of numbers")
    label_type = dataset.schema.field(label).type  # floats too: pandas writes a label column with a gap as float64
    if not (pa.types.is_integer(label_type) or pa.types.is_floating(label_type)):
        raise BadInput(f"{path}: column {label!r} is {label_type}, expected integer class labels (map them to 0..K-1 "
                       "first, and keep the mapping)")
    scan = SplitScan(path=path, nan={c: 0 for c in features}, inf={c: 0 for c in features},
                     extra={c: [] for c in extra_columns})
    try:
        for fragment in dataset.fragments:
            for batch in fragment.to_batches(columns=list(dict.fromkeys([*features, label, *extra_columns]))):
                _accumulate(scan, batch, features, label, num_classes, path)
                for column in extra_columns:
                    scan.extra[column].extend(batch.column(column).to_numpy(zero_copy_only=False).tolist())
                if scorer is not None:
                    y = batch.column(label).to_numpy(zero_copy_only=False).astype(np.int64)
                    scan.extra.setdefault("score", []).extend(scorer(feature_matrix(batch, features), y).tolist())
    except BadInput as exc:
        raise BadInput(f"{path}: {exc}" if not str(exc).startswith(path) else str(exc)) from None
    except Exception as exc:
        raise BadInput(f"{field_name}: {path}: unreadable ({str(exc).splitlines()[0]})") from None
    if scan.rows == 0:
        raise BadInput(f"{path}: no rows")
    width = math.prod(shape) if shape else None
    if width is not None and scan.width != width:
        columns = f"column {features[0]!r} has" if len(features) == 1 else f"data.features' {len(features)} columns give"
        raise BadInput(f"{path}: {columns} {scan.width} values per row but data.shape {shape} needs {width}")
    return scan


def _accumulate(scan: SplitScan, batch, features, label, num_classes, path) -> None:
    if batch.num_rows == 0:
        return
    x = feature_matrix(batch, features)
    if scan.width and x.shape[1] != scan.width:
        raise BadInput(f"{path}: rows of {features[0]!r} have different lengths ({scan.width} and {x.shape[1]})")
    scan.width = x.shape[1]
    offset = 0
    for column in features:  # per-column NaN/Inf row counts
        w = feature_matrix(batch, [column]).shape[1]
        block = x[:, offset:offset + w]
        scan.nan[column] += int(np.isnan(block).any(axis=1).sum())
        scan.inf[column] += int(np.isinf(block).any(axis=1).sum())
        offset += w
    finite = np.isfinite(x)
    clean = np.where(finite, x, 0.0)
    if scan.sum is None:
        scan.sum, scan.sumsq, scan.count = np.zeros(x.shape[1]), np.zeros(x.shape[1]), np.zeros(x.shape[1])
    scan.sum += clean.sum(0)
    scan.sumsq += (clean * clean).sum(0)
    scan.count += finite.sum(0)
    if len(scan.sample) < MEDIAN_SAMPLE_ROWS:
        scan.sample.extend(x[: MEDIAN_SAMPLE_ROWS - len(scan.sample)])
    y = batch.column(label).to_numpy(zero_copy_only=False).astype(np.float64)  # a null (missing) label is NaN
    fractional = np.isfinite(y) & (y != np.floor(y))
    scan.fractional_label_rows += int(fractional.sum())
    valid = ~np.isnan(y) & ~fractional
    yi = y[valid].astype(np.int64)
    label_bad = ~valid
    if num_classes is not None:
        yy = np.where(valid, y, -1)
        label_bad = (yy < 0) | (yy >= num_classes)
    scan.bad_label_rows += int(label_bad.sum())
    scan.bad_rows += int((~finite.all(axis=1) | label_bad).sum())
    scan.bad_rows_imputed += int((np.isinf(x).any(axis=1) | label_bad).sum())
    if len(yi):
        scan.label_min = int(yi.min()) if scan.label_min is None else min(scan.label_min, int(yi.min()))
        scan.label_max = int(yi.max()) if scan.label_max is None else max(scan.label_max, int(yi.max()))
        for value, n in zip(*np.unique(yi, return_counts=True)):
            scan.class_counts[int(value)] = scan.class_counts.get(int(value), 0) + int(n)
    scan.rows += batch.num_rows


def mean_std(scan: SplitScan) -> tuple[np.ndarray, np.ndarray]:
    n = np.maximum(scan.count, 1)
    mean = scan.sum / n
    var = np.maximum(scan.sumsq / n - mean * mean, 0.0)
    return mean, np.sqrt(var)


def nan_median(scan: SplitScan) -> np.ndarray:
    sample = np.asarray(scan.sample, dtype=np.float64)
    sample = np.where(np.isfinite(sample), sample, np.nan)
    med = np.nanmedian(sample, axis=0)
    return np.where(np.isnan(med), 0.0, med)


def describe(scan: SplitScan) -> list[tuple[str, str]]:
    """Rows for `keel data inspect`."""
    balance = ", ".join(f"{k}: {v} ({v / max(scan.rows, 1):.1%})" for k, v in sorted(scan.class_counts.items()))
    return [("rows", str(scan.rows)), ("features per row", str(scan.width)),
            ("NaN rows per column", ", ".join(f"{k}: {v}" for k, v in scan.nan.items())),
            ("Inf rows per column", ", ".join(f"{k}: {v}" for k, v in scan.inf.items())),
            ("label range", f"{scan.label_min} .. {scan.label_max}"), ("class balance", balance or "-"),
            *([("rows without a class label", f"{scan.bad_label_rows} ({scan.fractional_label_rows} not whole numbers)")]
              if scan.bad_label_rows else [])]

