"""The pictures people would otherwise make by hand (matplotlib, headless)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from orchestrator import metric_keys as mk
from orchestrator.numbers import finite

STYLE = {"figure.figsize": (8, 4.2), "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
         "axes.spines.right": False, "font.size": 10}
GUARD_COLOURS = {"nonfinite": "tab:red", "loss_spike": "tab:orange", "grad_norm_spike": "tab:purple", "fault": "tab:gray"}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _finite(xs, ys):
    pairs = [(x, y) for x, y in zip(xs, ys) if finite(y)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def loss_curves(history: list[dict], events: list[dict], steps_per_epoch: float, path: Path) -> Path:
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots()
        epochs = [h[mk.EPOCH] + 1 for h in history]
        for key, label in ((mk.TRAIN_LOSS, "train loss"), (mk.VAL_LOSS, "validation loss")):
            ax.plot(*_finite(epochs, [h.get(key) for h in history]), marker="o", label=label)
        for name in mk.extra_val_names(history[-1]) if history else []:  # data.extra_val: e.g. the old data
            ax.plot(*_finite(epochs, [h.get(mk.extra_val(mk.VAL_LOSS, name)) for h in history]), marker="o",
                    linestyle="--", label=f"validation loss ({name})")
        shown = set()
        for e in events:
            x = e["step"] / max(steps_per_epoch, 1) + 1
            trigger = e["trigger"]
            ax.axvline(x, color=GUARD_COLOURS.get(trigger, "black"), linestyle="--", alpha=0.7,
                       label=f"guard: {trigger} ({e['action']})" if trigger not in shown else None)
            shown.add(trigger)
        ax.set(title="Loss by epoch (dashed: guard events)", xlabel="epoch", ylabel="cross-entropy loss")
        _integer_x(ax)
        if history and all((h.get(mk.TRAIN_LOSS) or 1) > 0 for h in history):
            _plain_log_axis(ax)
        ax.legend()
        return _save(fig, path)


def accuracy_curves(history: list[dict], path: Path) -> Path:
    """Validation accuracy by epoch, and on each extra validation set (fine-tuning: what was forgotten)."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots()
        epochs = [h[mk.EPOCH] + 1 for h in history]
        ax.plot(*_finite(epochs, [h.get(mk.VAL_ACCURACY) for h in history]), marker="o", label="validation")
        for name in mk.extra_val_names(history[-1]) if history else []:
            ax.plot(*_finite(epochs, [h.get(mk.extra_val(mk.VAL_ACCURACY, name)) for h in history]), marker="o",
                    linestyle="--", label=f"validation ({name})")
        ax.set(title="Validation accuracy by epoch", xlabel="epoch", ylabel="accuracy")
        _integer_x(ax)
        ax.legend()
        return _save(fig, path)


def _integer_x(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _plain_log_axis(ax) -> None:
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())


def grad_norm(steps: list[dict], history: list[dict], clip: dict, path: Path) -> Path:
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots()
        ax.plot(*_finite([s[mk.GLOBAL_STEP] for s in steps], [s.get(mk.GRAD_NORM) for s in steps]),
                label="pre-clip global norm (sampled steps)")
        ax.plot(*_finite([s[mk.GLOBAL_STEP] for s in steps], [s.get(mk.GRAD_NORM_POST_CLIP) for s in steps]),
                linestyle=":", color="tab:green", label="after clipping")
        ax.plot(*_finite([h.get(mk.STEP) for h in history], [h.get(mk.GRAD_NORM_MAX) for h in history]), "v",
                color="tab:orange", label="largest in each epoch")
        if clip.get("mode") == "norm":
            ax.axhline(clip["max_norm"], color="tab:red", linestyle="--", label=f"clip threshold ({clip['max_norm']:g})")
        ax.set(title=f"Gradient norm (clipping: {clip.get('mode', '?')})", xlabel="optimizer step", ylabel="L2 norm")
        _plain_log_axis(ax)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4, fontsize=8, frameon=False)
        return _save(fig, path)


def learning_rate(steps: list[dict], path: Path) -> Path:
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots()
        ax.plot(*_finite([s[mk.GLOBAL_STEP] for s in steps], [s.get(mk.LR) for s in steps]), color="tab:green")
        ax.set(title="Learning rate schedule", xlabel="optimizer step", ylabel="learning rate")
        return _save(fig, path)


def throughput(history: list[dict], path: Path) -> Path:
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots()
        epochs = [h[mk.EPOCH] + 1 for h in history]
        ax.bar(epochs, [h.get(mk.SAMPLES_PER_S) or 0 for h in history], color="tab:blue", alpha=0.7, label="samples/s")
        ax.set(title="Throughput and data wait", xlabel="epoch", ylabel="samples per second (all workers)")
        _integer_x(ax)
        twin = ax.twinx()
        twin.plot(epochs, [100 * (h.get(mk.DATA_WAIT_FRAC) or 0) for h in history], color="tab:red", marker="o",
                  label="data wait")
        twin.set_ylabel("time waiting for data (%)")
        twin.set_ylim(0, 100)
        lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(lines, ["samples/s", "data wait (%)"], loc="upper left")
        return _save(fig, path)


def layer_heatmap(history: dict, path: Path) -> Path:
    import numpy as np

    names, samples = history["names"], history["samples"]
    data = np.array([[v if v is not None and math.isfinite(v) and v > 0 else np.nan for v in s["grad_norms"]]
                     for s in samples]).T
    with plt.rc_context({**STYLE, "axes.grid": False, "figure.figsize": (8, 0.25 * len(names) + 1.5)}):
        fig, ax = plt.subplots()
        image = ax.imshow(np.log10(data), aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xticks(range(len(samples)), [s["step"] for s in samples], fontsize=7)
        ax.set(title="Per-layer gradient norm (log10, sampled steps; white = exactly zero)", xlabel="optimizer step")
        fig.colorbar(image, ax=ax, label="log10 gradient L2 norm")
        return _save(fig, path)


def sweep_scatter(rows, param: str, metric: str, log_x: bool, path: Path) -> Path:
    colours = {"TERMINATED": "tab:green", "diverged": "tab:red", "ERROR": "black"}
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots()
        for status, colour in colours.items():
            pts = [(r.config.get(param), r.metric) for r in rows if r.status == status and r.config.get(param) is not None]
            measured = [(x, y) for x, y in pts if finite(y)]
            if measured:
                ax.scatter(*zip(*measured), color=colour, label=status.lower() if status != "TERMINATED" else "finished", s=40)
            no_metric = [x for x, y in pts if (x, y) not in measured]
            if no_metric:  # e.g. a diverged trial whose metric is NaN: mark it on the bottom edge
                ax.scatter(no_metric, [ax.get_ylim()[0]] * len(no_metric), color=colour, marker="x", s=60,
                           label=f"{status.lower()} (no finite {metric})")
        if log_x:
            ax.set_xscale("log")
        ax.set(title=f"{metric} by {param}", xlabel=param, ylabel=metric)
        ax.legend()
        return _save(fig, path)


def trial_curves(results: list[dict], metric: str, trial: str, path: Path) -> Path:
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots()
        it = [r["training_iteration"] for r in results]
        ax.plot(*_finite(it, [r.get(metric) for r in results]), marker="o", label=metric, color="tab:green")
        ax.set(title=f"Best trial {trial}", xlabel="report (epoch)", ylabel=metric)
        _integer_x(ax)
        twin = ax.twinx()
        twin.plot(*_finite(it, [r.get(mk.TRAIN_LOSS) for r in results]), marker="s", color="tab:blue", label="train loss")
        twin.set_ylabel("train loss")
        lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(lines, [metric, "train loss"], loc="center right")
        return _save(fig, path)
