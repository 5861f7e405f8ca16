"""`keel stress`: every scenario under the plain and the keel profile, in one invocation on one Ray.

Output (in --out): stress.json (every run), stress.md (the table), stress_losses.png (loss curves).
A run counts as diverged when it ended diverged/failed or its final train or validation loss is not
finite; it converged when its final validation accuracy is within `tolerance` of the tuned reference.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from orchestrator import metric_keys as mk
from orchestrator.numbers import finite
from orchestrator.stress.scenarios import SCENARIOS, reference_job, prepare_data, scenario_job

TOLERANCE = 0.02  # "within 2 points of the tuned run"


@dataclass
class RunResult:
    scenario: str
    profile: str                # plain | keel | reference
    status: str
    accuracy: Optional[float]
    train_loss: Optional[float]
    val_loss: Optional[float]
    diverged: bool
    converged: bool = False
    seconds: float = 0.0
    run_dir: str = ""


def run_one(tree: dict, scenario: str, profile: str) -> RunResult:
    import time

    from orchestrator.spec import JobSpec
    from orchestrator.train.driver import run_job

    start = time.monotonic()
    outcome = run_job(JobSpec.model_validate(tree))
    final = outcome.final
    diverged = (outcome.status in ("diverged", "failed") or not finite(final.get(mk.TRAIN_LOSS))
                or not finite(final.get(mk.VAL_LOSS)))
    accuracy = final.get(mk.VAL_ACCURACY)
    return RunResult(scenario, profile, outcome.status, accuracy if finite(accuracy) else None,
                     final.get(mk.TRAIN_LOSS), final.get(mk.VAL_LOSS), diverged,
                     seconds=round(time.monotonic() - start, 1), run_dir=str(outcome.run_dir))


def run_stress(out: Path, names: list[str], epochs: dict[str, int], seeds: int = 2,
               on_run: Callable[[RunResult], None] = lambda r: None) -> dict:
    """Every chosen scenario x {plain, keel} x seeds, plus each reference workload x seeds, on one Ray."""
    import shutil

    from orchestrator.ray_session import ensure_ray

    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "runs", ignore_errors=True)  # fresh runs: a run name that exists would resume instead
    chosen = [s for s in SCENARIOS if s.name in names]
    data, storage = prepare_data(out / "data"), out / "runs"
    ensure_ray(None)

    def seeded(tree: dict, seed: int) -> dict:
        tree["run"].update(seed=seed, name=f"{tree['run']['name']}-s{seed}")
        return tree

    references: dict[str, list[RunResult]] = {}
    for workload in sorted({s.reference for s in chosen}):
        for seed in range(seeds):
            result = run_one(seeded(reference_job(workload, data, epochs, storage), seed), "tuned", "reference")
            references.setdefault(workload, []).append(result)
            on_run(result)
    bars = {w: mean_accuracy(runs) for w, runs in references.items()}
    results = []
    for scenario in chosen:
        bar = bars[scenario.reference]
        for profile_name in ("plain", "keel"):
            for seed in range(seeds):
                tree = seeded(scenario_job(scenario, profile_name, data, epochs, storage), seed)
                result = run_one(tree, scenario.name, profile_name)
                result.converged = (not result.diverged and result.accuracy is not None and bar is not None
                                    and result.accuracy >= bar - TOLERANCE)
                results.append(result)
                on_run(result)
    cells = summarize(chosen, results, bars)
    summary = {"epochs": epochs, "tolerance": TOLERANCE, "seeds": seeds,
               "references": {k: [asdict(r) for r in v] for k, v in references.items()}, "bars": bars,
               "runs": [asdict(r) for r in results], "cells": cells,
               "converged": {p: sum(c[p]["converged"] for c in cells.values()) for p in ("plain", "keel")},
               "no_harm": sum(c["no_harm"] for c in cells.values()), "scenarios": len(chosen)}
    (out / "stress.json").write_text(json.dumps(summary, indent=1))
    (out / "stress.md").write_text(markdown_table(summary))
    loss_figure(summary, out / "stress_losses.png")
    return summary


def mean_accuracy(runs: list[RunResult]) -> Optional[float]:
    """A diverged or unfinished run counts as 0 accuracy: a mean over survivors would flatter."""
    values = [r.accuracy if (r.accuracy is not None and not r.diverged) else 0.0 for r in runs]
    return sum(values) / len(values) if values else None


def summarize(chosen, results: list[RunResult], bars: dict) -> dict:
    """Per scenario and profile: mean and range of accuracy over seeds, diverged runs, and the verdicts.
    A cell converged when its mean is within TOLERANCE of its reference and no seed diverged; `flips`
    says the seeds disagreed (a verdict that flips with the seed is not a result). Do-no-harm: keel's
    mean >= plain's mean - 1 point."""
    cells = {}
    for scenario in chosen:
        cell = {}
        for profile_name in ("plain", "keel"):
            runs = [r for r in results if r.scenario == scenario.name and r.profile == profile_name]
            accs = [r.accuracy if (r.accuracy is not None and not r.diverged) else 0.0 for r in runs]  # as in the mean
            mean = mean_accuracy(runs)
            bar = bars.get(scenario.reference)
            diverged = sum(r.diverged for r in runs)
            converged = bool(mean is not None and bar is not None and not diverged and mean >= bar - TOLERANCE)
            cell[profile_name] = {"mean": mean, "min": min(accs), "max": max(accs), "diverged": diverged,
                                  "converged": converged, "flips": len({r.converged for r in runs}) > 1}
        cell["no_harm"] = cell["keel"]["mean"] >= cell["plain"]["mean"] - 0.01
        cells[scenario.name] = cell
    return cells


def markdown_table(summary: dict) -> str:
    from orchestrator.stress.scenarios import BY_NAME

    def cell(c: dict) -> str:
        spread = f" ({c['min']:.3f}–{c['max']:.3f})" if summary["seeds"] > 1 else ""
        verdict = ("yes" if c["converged"] else "no") + (" †" if c["flips"] else "")
        return f"{c['mean']:.3f}{spread} | {c['diverged'] or '—'} | {verdict}"

    refs = ", ".join(f"{k} {v:.3f}" for k, v in summary["bars"].items() if v is not None)
    n, seeds = summary["scenarios"], summary["seeds"]
    lines = [f"Mean final val accuracy over {seeds} seed(s), (min–max). Tuned references (same model and data, no fault): "
             f"{refs}. Converged = mean within {summary['tolerance'] * 100:g} points of its reference and no seed "
             "diverged; † = the seeds disagree on that verdict.", "",
             "| scenario | what | plain acc | plain diverged | plain converged | keel acc | keel diverged | keel converged |",
             "|---|---|---|---|---|---|---|---|"]
    for name, c in summary["cells"].items():
        lines.append(f"| {name} | {BY_NAME[name].what} | {cell(c['plain'])} | {cell(c['keel'])} |")
    conv = summary["converged"]
    lines += ["", f"Converged: **keel {conv['keel']}/{n}**, plain {conv['plain']}/{n}. "
              f"Keel no worse than plain − 1 point: {summary['no_harm']}/{n}."]
    return "\n".join(lines) + "\n"


def step_losses(run_dir: str) -> tuple[list[int], list[float]]:
    from orchestrator.train.run_files import read_steps

    rows = read_steps(Path(run_dir))
    return [r[mk.GLOBAL_STEP] for r in rows], [r[mk.LOSS] if finite(r[mk.LOSS]) else math.nan for r in rows]


def loss_figure(summary: dict, path: Path) -> Path:
    from orchestrator.report.plots import STYLE, _save, plt

    names = list(dict.fromkeys(r["scenario"] for r in summary["runs"]))
    cols = min(4, max(1, len(names)))
    rows_n = math.ceil(len(names) / cols)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(rows_n, cols, figsize=(3.6 * cols, 2.9 * rows_n), squeeze=False)
        for ax, name in zip(axes.flat, names):
            for run in (r for r in summary["runs"] if r["scenario"] == name and r["run_dir"].endswith("-s0")):
                x, y = step_losses(run["run_dir"])
                colour = "tab:red" if run["profile"] == "plain" else "tab:blue"
                label = f"{run['profile']}{' (diverged)' if run['diverged'] else ''}"
                ax.plot(x, y, color=colour, lw=1, label=label)
                if run["diverged"] and x:  # mark where a plain run's loss stopped being finite
                    bad = next((xi for xi, yi in zip(x, y) if not math.isfinite(yi)), None)
                    if bad is not None:
                        ax.axvline(bad, color=colour, ls=":", lw=1)
            ax.set_yscale("log")
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.legend(fontsize=7, loc="upper right")
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        fig.suptitle("Training loss: plain loop (red) vs Keel defaults (blue); dotted: first non-finite loss", fontsize=10)
        return _save(fig, path)
