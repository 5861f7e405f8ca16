"""Parquet sources: checked on the driver before anything starts, then read with Ray Data."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.parquet as pq

from orchestrator.errors import BadInput


def resolve(path: str) -> str:
    """Local paths become absolute (Ray Data tasks run elsewhere); URIs pass through."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def check_split(path: str, field: str, data_spec) -> int:
    """Schema check from Parquet metadata only (no data read); returns the row count."""
    if "://" in path:
        return -1  # cloud storage: checked when Ray Data reads it
    p = Path(path)
    if not p.exists():
        raise BadInput(f"{field}: {path}: no such file or directory")
    try:
        dataset = pq.ParquetDataset(str(p))
        schema = dataset.schema
        rows = sum(fragment.count_rows() for fragment in dataset.fragments)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise BadInput(f"{field}: {path}: not readable as Parquet ({str(exc).splitlines()[0]})") from None
    for column in (data_spec.features, data_spec.label):
        if column not in schema.names:
            raise BadInput(f"{path}: column {column!r} missing (has {', '.join(schema.names)})")
    width = getattr(schema.field(data_spec.features).type, "list_size", None)
    if width is not None and width != math.prod(data_spec.shape):
        raise BadInput(f"{path}: column {data_spec.features!r} has {width} values per row but data.shape "
                       f"{data_spec.shape} needs {math.prod(data_spec.shape)}")
    if rows == 0:
        raise BadInput(f"{path}: no rows")
    return rows


IN_DRIVER_BYTES = 256 * 2**20  # local splits smaller than this are read by the driver itself


def _size(path: str) -> float:
    p = Path(path)
    if "://" in path or not p.exists():
        return float("inf")
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def read_dataset(path: str, columns: list[str]):
    """A materialized Ray Dataset: each epoch streams it from the object store instead of re-reading
    Parquet (measured on digits: data-wait fell from 50-70% to ~10% of the epoch). Small local files
    are read in the driver, which saves ~5 s of read-task start-up on a 2-core machine."""
    import ray.data

    path = resolve(path)
    if _size(path) < IN_DRIVER_BYTES:
        return ray.data.from_arrow(pq.read_table(path, columns=columns))
    return ray.data.read_parquet(path, columns=columns).materialize()


def read_datasets(data_spec) -> dict:
    columns = [data_spec.features, data_spec.label]
    return {split: read_dataset(getattr(data_spec, split), columns) for split in ("train", "val")}
