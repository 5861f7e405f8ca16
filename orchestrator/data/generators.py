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


def write_split(path: Path, features: np.ndarray, labels: np.ndarray, column: str = "image", extra: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {column: _tensor_column(features.reshape(len(features), -1)), "label": pa.array(labels.astype(np.int64))}
    columns.update({k: pa.array(v) for k, v in (extra or {}).items()})
    table = pa.table(columns)
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


def make_digits_shifted(out: str | Path, val_fraction: float = 0.2, seed: int = 0) -> tuple[Path, Path]:
    """The same digits under a covariate shift, for fine-tuning and drift demos: every image turned a
    quarter and its ink fainter on a grey background (0.6 x + 0.25), the same split as `digits`."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (np.rot90(digits.images, k=1, axes=(1, 2)) / 16.0 * 0.6 + 0.25).astype(np.float32)
    x_tr, x_va, y_tr, y_va = train_test_split(x, digits.target, test_size=val_fraction, random_state=seed, stratify=digits.target)
    out = Path(out)
    write_split(out / "train.parquet", x_tr, y_tr)
    write_split(out / "val.parquet", x_va, y_va)
    return out / "train.parquet", out / "val.parquet"


def _split(out, x, y, val_fraction, column, extra=None):
    n_val = int(len(x) * val_fraction)
    extra = extra or {}
    out = Path(out)
    write_split(out / "train.parquet", x[n_val:], y[n_val:], column, {k: v[n_val:] for k, v in extra.items()})
    write_split(out / "val.parquet", x[:n_val], y[:n_val], column, {k: v[:n_val] for k, v in extra.items()})
    return out / "train.parquet", out / "val.parquet"


def make_synthetic(out, rows: int = 20_000, shape=(3, 32, 32), classes: int = 10, seed: int = 0, val_fraction: float = 0.1):
    """Images of a given shape for throughput tests: a smooth random template per class plus noise
    (learnable, but not trivially). Column 'image', shape given by `shape`."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    coarse = rng.normal(size=(classes, c, max(2, h // 4), max(2, w // 4))).astype(np.float32)
    templates = coarse.repeat(h // coarse.shape[2] + 1, axis=2)[:, :, :h].repeat(w // coarse.shape[3] + 1, axis=3)[:, :, :, :w]
    y = rng.integers(0, classes, rows)
    x = templates[y] + rng.normal(scale=1.5, size=(rows, c, h, w)).astype(np.float32)
    return _split(out, x, y, val_fraction, "image")


def make_tabular(out, rows: int = 5_000, features: int = 16, classes: int = 3, missing: float = 0.0, seed: int = 0,
                 val_fraction: float = 0.2):
    """Gaussian class blobs with features on very different scales (standardisation matters), an
    optional fraction of NaN cells (imputation), and a 'difficulty' column: distance to the class centre."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=2.0, size=(classes, features))
    scales = 10.0 ** rng.uniform(-2, 3, features)
    y = rng.integers(0, classes, rows)
    noise = rng.normal(size=(rows, features))
    x = (centres[y] + noise) * scales
    difficulty = np.linalg.norm(noise, axis=1)
    if missing:
        x[rng.random(x.shape) < missing] = np.nan
    return _split(out, x, y, val_fraction, "features", {"difficulty": difficulty})


def make_sequence(out, rows: int = 8_000, length: int = 32, classes: int = 2, seed: int = 0, val_fraction: float = 0.2):
    """Noisy sequences whose label is the sign of their sum (class 1 if positive): an LSTM must integrate
    over the whole sequence. Column 'sequence' with shape [length, 1]."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, length, 1)).astype(np.float32)
    y = (x.sum(axis=(1, 2)) > 0).astype(np.int64) if classes == 2 else np.digitize(x.sum(axis=(1, 2)), np.linspace(-length ** 0.5, length ** 0.5, classes - 1))
    return _split(out, x, y, val_fraction, "sequence")


def make_tokens(out, rows: int = 16_000, length: int = 12, vocab: int = 16, seed: int = 0, val_fraction: float = 0.2):
    """Uniform random token sequences (one-hot); the label says whether the FIRST token appears again
    later (about half the rows at these sizes: 1 - (15/16)^11 = 0.51). No count of tokens answers it, and
    no single position: the first token has to be compared with every other one, which is what attention
    does. Column 'tokens' with shape [length, vocab]."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (rows, length))
    y = (tokens[:, 1:] == tokens[:, :1]).any(axis=1).astype(np.int64)
    return _split(out, np.eye(vocab, dtype=np.float32)[tokens], y, val_fraction, "tokens")


GRAPH_KINDS = ("assortative", "disassortative", "random")


def make_graphs(out, rows: int = 6_000, nodes: int = 16, node_features: int = 4, signal: float = 1.0, seed: int = 0,
                val_fraction: float = 0.2):
    """Graph classification on stochastic block models. Each graph has two hidden communities; its class
    says how edges follow them: 0 assortative (p_in 0.45, p_out 0.05), 1 disassortative (the reverse),
    2 random (p 0.25, the same mean degree). Node feature 0 is the node's community (+-signal) plus unit
    noise, the others pure noise: only by comparing a node with its neighbours can the class be told.
    Column 'graph': [nodes, nodes + node_features], the adjacency then the features."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(GRAPH_KINDS), rows)
    side = np.where(np.arange(nodes)[None, :] < nodes // 2, 1.0, -1.0) * np.ones((rows, 1))
    side = np.take_along_axis(side, rng.permuted(np.tile(np.arange(nodes), (rows, 1)), axis=1), axis=1)
    same = side[:, :, None] == side[:, None, :]
    p_in = np.array([0.45, 0.05, 0.25])[y][:, None, None]
    p_out = np.array([0.05, 0.45, 0.25])[y][:, None, None]
    upper = np.triu(rng.random((rows, nodes, nodes)) < np.where(same, p_in, p_out), k=1)
    adjacency = (upper | upper.transpose(0, 2, 1)).astype(np.float32)
    features = rng.normal(size=(rows, nodes, node_features)).astype(np.float32)
    features[:, :, 0] += signal * side
    return _split(out, np.concatenate([adjacency, features], axis=2), y, val_fraction, "graph")


GENERATORS = {"digits": make_digits, "digits_shifted": make_digits_shifted, "synthetic": make_synthetic, "tabular": make_tabular, "sequence": make_sequence,
              "tokens": make_tokens, "graphs": make_graphs}
