"""How far new data has moved from the data a checkpoint was trained on (fine-tuning, `keel validate`).

A run records a small reference of its training split in every checkpoint: per unit (each feature, or
each channel for inputs wider than MAX_UNITS), the decile edges and the mean and std of a sample of rows.
New data is compared unit by unit with the Population Stability Index over those deciles (PSI: 0 for the
same distribution; by the usual convention < 0.1 no shift, 0.1-0.25 moderate, > 0.25 major) and the mean
shift in the reference's standard deviations (of the unit, or of the whole input for a unit that was
constant in the reference).
"""

from __future__ import annotations

import numpy as np

MAX_UNITS = 1024        # wider inputs (images) are compared per channel
REFERENCE_ROWS = 5_000  # sample rows the reference is built from
MAJOR_PSI, MODERATE_PSI = 0.25, 0.1
EPS = 1e-4


def _units(sample: np.ndarray, shape: list[int]) -> tuple[str, list[np.ndarray]]:
    """('feature' | 'channel', one array of values per unit) from a sample of rows (rows x width)."""
    sample = np.asarray(sample, dtype=np.float64)[:REFERENCE_ROWS]
    if sample.shape[1] <= MAX_UNITS or len(shape) < 2:
        return "feature", [sample[:, i] for i in range(sample.shape[1])]
    per_channel = sample.reshape(len(sample), shape[0], -1)
    return "channel", [per_channel[:, c, :].ravel() for c in range(shape[0])]


def reference(sample, shape: list[int]) -> dict:
    """The training split's reference, small enough to travel in every checkpoint."""
    level, units = _units(sample, shape)
    finite = [u[np.isfinite(u)] for u in units]
    return {"level": level,
            "edges": [np.quantile(u, np.linspace(0.1, 0.9, 9)).tolist() if len(u) else [] for u in finite],
            "mean": [float(u.mean()) if len(u) else 0.0 for u in finite],
            "std": [float(u.std()) if len(u) else 0.0 for u in finite]}


def psi(edges: list[float], values: np.ndarray) -> float:
    """Population Stability Index of `values` against the reference deciles (10% of the reference each)."""
    if not edges or not len(values):
        return 0.0
    counts = np.bincount(np.searchsorted(np.asarray(edges), values, side="right"), minlength=10)[:10]
    new = np.maximum(counts / max(len(values), 1), EPS)
    old = np.full(10, 0.1)
    return float(np.sum((new - old) * np.log(new / old)))


def compare(ref: dict, sample, shape: list[int], names: list[str] | None = None) -> dict:
    """Per unit PSI and mean shift of new data against a reference; the most shifted units first.
    `names`: the features' column names (tabular data, one scalar column each), given to each row as `name`:
    a user knows 'income', not 'feature 4'."""
    level, units = _units(sample, shape)
    names = names if level == "feature" and names and len(names) == len(units) else None
    if level != ref["level"] or len(units) != len(ref["edges"]):
        return {"comparable": False, "reason": f"the reference has {len(ref['edges'])} {ref['level']}s, "
                                                f"the new data {len(units)} {level}s"}
    rows = []
    # A unit that was constant in the reference (an image's corner pixel) has no spread of its own to
    # measure a shift in: its shift is counted in the input's typical spread instead.
    typical = float(np.sqrt(np.mean(np.square(ref["std"])))) or 1.0
    for i, values in enumerate(units):
        values = values[np.isfinite(values)]
        scale = ref["std"][i] if ref["std"][i] > 0.01 * typical else typical
        shift = (float(values.mean()) - ref["mean"][i]) / scale if len(values) else 0.0
        rows.append({level: i, **({"name": names[i]} if names else {}),
                     "psi": round(psi(ref["edges"][i], values), 4), "mean_shift_std": round(shift, 3)})
    rows.sort(key=lambda r: -r["psi"])
    major = sum(r["psi"] > MAJOR_PSI for r in rows)
    moderate = sum(MODERATE_PSI < r["psi"] <= MAJOR_PSI for r in rows)
    return {"comparable": True, "level": level, "units": len(rows), "major": major, "moderate": moderate,
            "max_psi": rows[0]["psi"] if rows else 0.0, "most_shifted": rows[:10], "all": rows}


def summary_line(report: dict) -> str:
    if not report.get("comparable"):
        return f"drift: not compared ({report.get('reason', 'no reference')})"
    level = report["level"]
    top = ", ".join(f"{r.get('name') or f'{level} {r[level]}'} (PSI {r['psi']:.2f}, mean {r['mean_shift_std']:+.1f} sd)" for r in report["most_shifted"][:3])
    verdict = ("major shift" if report["major"] else "moderate shift" if report["moderate"] else "no notable shift")
    return (f"drift: {verdict} against the checkpoint's training data: {report['major']} of {report['units']} "
            f"{level}s PSI > {MAJOR_PSI}, {report['moderate']} moderate; most shifted: {top}")
