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


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def run_one(tree: dict, scenario: str, profile: str) -> RunResult:
    import time

    from orchestrator.spec import JobSpec
    from orchestrator.train.driver import run_job

    start = time.monotonic()
    outcome = run_job(JobSpec.model_validate(tree))
    final = outcome.final
    diverged = (outcome.status in ("diverged", "failed") or not finite(final.get("train_loss"))
                or not finite(final.get("val_loss")))
    accuracy = final.get("val_accuracy")
    return RunResult(scenario, profile, outcome.status, accuracy if finite(accuracy) else None,
                     final.get("train_loss"), final.get("val_loss"), diverged,
                     seconds=round(time.monotonic() - start, 1), run_dir=str(outcome.run_dir))


def run_stress(out: Path, names: list[str], epochs: dict[str, int], on_run: Callable[[RunResult], None] = lambda r: None) -> dict:
    import shutil

    from orchestrator.train.driver import ensure_ray

    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "runs", ignore_errors=True)  # fresh runs: a run name that exists would resume instead
    chosen = [s for s in SCENARIOS if s.name in names]
    data, storage = prepare_data(out / "data"), out / "runs"
    ensure_ray(None)
    references = {}
    for workload in sorted({s.reference for s in chosen}):
        references[workload] = run_one(reference_job(workload, data, epochs, storage), "tuned", "reference")
        on_run(references[workload])
    results = []
    for scenario in chosen:
        bar = references[scenario.reference].accuracy
        for profile_name in ("plain", "keel"):
            result = run_one(scenario_job(scenario, profile_name, data, epochs, storage), scenario.name, profile_name)
            result.converged = (not result.diverged and result.accuracy is not None and bar is not None
                                and result.accuracy >= bar - TOLERANCE)
            results.append(result)
            on_run(result)
    summary = {"epochs": epochs, "tolerance": TOLERANCE,
               "references": {k: asdict(v) for k, v in references.items()}, "runs": [asdict(r) for r in results],
               "converged": {p: sum(r.converged for r in results if r.profile == p) for p in ("plain", "keel")},
               "scenarios": len(chosen)}
    (out / "stress.json").write_text(json.dumps(summary, indent=1))
    (out / "stress.md").write_text(markdown_table(summary))
    loss_figure(summary, out / "stress_losses.png")
    return summary


def markdown_table(summary: dict) -> str:
    from orchestrator.stress.scenarios import BY_NAME

    def cell(run: dict) -> str:
        acc = f"{run['accuracy']:.3f}" if run["accuracy"] is not None else "—"
        return f"{acc} | {'**yes**' if run['diverged'] else 'no'} | {'yes' if run['converged'] else 'no'}"

    refs = ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in summary["references"].items() if v["accuracy"] is not None)
    lines = [f"Tuned reference val accuracy: {refs}. Converged = final val accuracy within "
             f"{summary['tolerance'] * 100:g} points of its reference.", "",
             "| scenario | what | plain acc | plain diverged | plain converged | keel acc | keel diverged | keel converged |",
             "|---|---|---|---|---|---|---|---|"]
    by = {(r["scenario"], r["profile"]): r for r in summary["runs"]}
    for name in dict.fromkeys(r["scenario"] for r in summary["runs"]):
        lines.append(f"| {name} | {BY_NAME[name].what} | {cell(by[name, 'plain'])} | {cell(by[name, 'keel'])} |")
    c, n = summary["converged"], summary["scenarios"]
    lines += ["", f"Converged: **keel {c['keel']}/{n}**, plain {c['plain']}/{n}."]
    return "\n".join(lines) + "\n"


def step_losses(run_dir: str) -> tuple[list[int], list[float]]:
    path = Path(run_dir) / "steps.jsonl"
    if not path.exists():
        return [], []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["global_step"] for r in rows], [r["loss"] if finite(r["loss"]) else math.nan for r in rows]


def loss_figure(summary: dict, path: Path) -> Path:
    from orchestrator.report.plots import STYLE, _save, plt

    names = list(dict.fromkeys(r["scenario"] for r in summary["runs"]))
    cols = min(4, max(1, len(names)))
    rows_n = math.ceil(len(names) / cols)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(rows_n, cols, figsize=(3.6 * cols, 2.9 * rows_n), squeeze=False)
        for ax, name in zip(axes.flat, names):
            for run in (r for r in summary["runs"] if r["scenario"] == name):
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
