"""`keel report`: PNGs and an HTML page for a run directory or a sweep's experiment directory."""

from __future__ import annotations

import html
import json
from pathlib import Path

import yaml

from orchestrator import metric_keys as mk
from orchestrator.errors import BadInput
from orchestrator.numbers import finite
from orchestrator.report import plots
from orchestrator.report.console import fmt
from orchestrator.train.run_files import read_metrics, read_stability, read_steps

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>
body{{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;color:#222}} h1{{font-size:1.4em}}
table{{border-collapse:collapse;margin:1em 0}} td,th{{border:1px solid #ddd;padding:4px 10px;text-align:left}}
.summary{{background:#f6f6f6;padding:0.8em 1em;border-left:4px solid #888}} img{{max-width:100%;margin:0.5em 0}}
.diverged{{color:#b00}}</style></head><body><h1>{title}</h1>{body}</body></html>"""


def _table(rows: list[tuple[str, str]], header: tuple[str, ...] = ()) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def run_report(run_dir: Path) -> tuple[Path, str]:
    """Write run_dir/report/{index.html, *.png}; return (html path, a text summary)."""
    run_dir = Path(run_dir)
    history = read_metrics(run_dir)
    if not history:
        raise BadInput(f"{run_dir}: no metrics.jsonl: not a Keel run directory (or it has not finished an epoch)")
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").exists() else {}
    steps, stability = read_steps(run_dir), read_stability(run_dir)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    events = (stability or {}).get("events") or [e for h in history for e in h.get(mk.EVENTS) or []]
    steps_per_epoch = history[0][mk.STEP] / (history[0][mk.EPOCH] + 1) if history[0].get(mk.STEP) else 1
    images = [plots.loss_curves(history, events, steps_per_epoch, out / "loss.png"),
              plots.accuracy_curves(history, out / "accuracy.png")]
    if steps:
        images += [plots.grad_norm(steps, history, config.get("stability", {}).get("clip", {}), out / "grad_norm.png"),
                   plots.learning_rate(steps, out / "lr.png")]
    images.append(plots.throughput(history, out / "throughput.png"))
    heat = (stability or {}).get("grad_norm_history")
    if heat and heat.get("samples"):
        images.append(plots.layer_heatmap(heat, out / "layers.png"))
    final = history[-1]
    best_acc = max((h[mk.VAL_ACCURACY] for h in history if finite(h.get(mk.VAL_ACCURACY))), default=None)
    summary_rows = [("epochs", str(final[mk.EPOCH] + 1)), ("best val accuracy", fmt(best_acc)),
                    ("final val accuracy", fmt(final.get(mk.VAL_ACCURACY))),
                    *((f"final val accuracy ({html.escape(name)})", fmt(final[mk.extra_val(mk.VAL_ACCURACY, name)]))
                      for name in mk.extra_val_names(final)),
                    ("final val loss", fmt(final.get(mk.VAL_LOSS))),
                    ("skipped steps", str(final.get(mk.SKIPPED_STEPS, 0))), ("spikes / rollbacks",
                    f"{final.get(mk.SPIKES, 0)} / {final.get(mk.ROLLBACKS, 0)}"),
                    ("stop reason", html.escape(final.get(mk.STOP_REASON) or "-"))]
    text = (stability or {}).get("summary") or "No stability report (diagnostics off)."
    body = (f"<p>Run directory: <code>{html.escape(str(run_dir))}</code></p>" + _table(summary_rows) +
            f"<p class='summary'>{html.escape(text)}</p>" + _drift_section(run_dir) +
            "".join(f"<img src='{p.name}' alt='{p.stem}'>" for p in images))
    page = out / "index.html"
    page.write_text(PAGE.format(title=f"Keel run: {html.escape(run_dir.name)}", body=body))
    terminal = (f"{run_dir.name}: {final[mk.EPOCH] + 1} epochs, best val accuracy {fmt(best_acc)}, final "
                f"{fmt(final.get(mk.VAL_ACCURACY))}; {text}")
    return page, terminal


def _drift_section(run_dir: Path) -> str:
    """A fine-tuning run's drift.json: its one line and the most-shifted units; nothing for other runs."""
    from orchestrator.data.drift import summary_line

    path = run_dir / "drift.json"
    if not path.exists():
        return ""
    shift = json.loads(path.read_text())
    rows = [(html.escape(str(r.get("name", r[shift["level"]]))), fmt(r["psi"]), f"{r['mean_shift_std']:+.2f}")
            for r in shift.get("most_shifted", [])]
    table = _table(rows, (shift["level"], "PSI (> 0.25: major)", "mean shift (sd)")) if rows else ""
    return f"<h2>Drift from the checkpoint's training data</h2><p>{html.escape(summary_line(shift))}</p>{table}"


def sweep_report(exp_dir: Path) -> tuple[Path, str]:
    from orchestrator.sweep.driver import summarize
    from orchestrator.sweep.spec import SweepSpec

    exp_dir = Path(exp_dir)
    sweep = SweepSpec.model_validate(yaml.safe_load((exp_dir / "keel_sweep.yaml").read_text()))
    outcome = summarize(exp_dir, sweep.metric, sweep.mode)
    out = exp_dir / "report"
    out.mkdir(exist_ok=True)
    images = []
    for i, (param, dist) in enumerate(sweep.search.items()):
        kind, args = next(iter(dist.items()))
        numeric = all(isinstance(v, (int, float)) for v in args)
        log_x = kind == "loguniform" or (kind == "grid" and numeric and min(args) > 0 and max(args) / min(args) >= 100)
        images.append(plots.sweep_scatter(outcome.rows, param, sweep.metric, log_x, out / f"param_{i}.png"))
    if outcome.best is not None:
        trial_dir = next(exp_dir.glob(f"*{outcome.best.trial_id}*/result.json"), None)
        if trial_dir is not None:
            results = [json.loads(line) for line in trial_dir.read_text().splitlines() if line.strip()]
            images.append(plots.trial_curves(results, sweep.metric, outcome.best.trial_id, out / "best_trial.png"))
    rows = [(html.escape(r.trial_id), f"<span class='{r.status.lower()}'>{html.escape(r.status.lower() if r.status == 'diverged' else r.status)}</span>",
             html.escape(", ".join(f"{k}={fmt(v)}" for k, v in r.config.items())), fmt(r.metric), str(r.iterations),
             html.escape(r.reason)) for r in outcome.rows]
    diverged = sum(r.status == "diverged" for r in outcome.rows)
    best = f"best: {outcome.best.trial_id} {sweep.metric}={fmt(outcome.best.metric)}" if outcome.best else "no healthy trial"
    body = (f"<p>{len(outcome.rows)} trials, {diverged} diverged; {html.escape(best)}</p>" +
            _table(rows, ("trial", "status", "params", sweep.metric, "reports", "why stopped")) +
            "".join(f"<img src='{p.name}' alt='{p.stem}'>" for p in images))
    page = out / "index.html"
    page.write_text(PAGE.format(title=f"Keel sweep: {html.escape(sweep.name)}", body=body))
    return page, f"{sweep.name}: {len(outcome.rows)} trials, {diverged} diverged; {best}"
