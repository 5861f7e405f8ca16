"""What `keel run` shows: a live step bar, one line per epoch, and a closing summary table."""

from __future__ import annotations

import os

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from orchestrator import metric_keys as mk
from orchestrator.train.changed_settings import describe

EPOCH_COLUMNS = [(mk.EPOCH, "epoch", "{}"), (mk.TRAIN_LOSS, "train loss", "{:.4f}"), (mk.VAL_LOSS, "val loss", "{:.4f}"),
                 (mk.VAL_ACCURACY, "val acc", "{:.4f}"), (mk.GRAD_NORM_MEAN, "|g| mean", "{:.3g}"),
                 (mk.GRAD_NORM_MAX, "|g| max", "{:.3g}"), (mk.LR, "lr", "{:.3g}"), (mk.SKIPPED_STEPS, "skipped", "{}"),
                 (mk.SAMPLES_PER_S, "samples/s", "{:.0f}")]


LOG_WIDTH = 120


def output_console() -> Console:
    """Keel's stdout. In a log (a pipe, a file, a Ray job's output streamed by keel submit) rich has no width
    to read and takes 80 columns, which folded the sweep table's headers ('val_accurac' / 'y') and every
    parameter list; a log gets LOG_WIDTH unless COLUMNS says otherwise. A terminal keeps its own width."""
    console = Console()
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console = Console(width=LOG_WIDTH)
    return console


def fmt(value, pattern: str = "{:.4g}") -> str:
    if value is None:  # no value (a run that failed before its first epoch, a trial yet to report): not a NaN
        return "-"
    try:
        return pattern.format(value)
    except (ValueError, TypeError):
        return str(value)


class RunDisplay:
    """Receives the driver's progress events. Live bar only on a terminal and when not quiet."""

    def __init__(self, console: Console, epochs: int, quiet: bool = False):
        self.console, self.epochs, self.quiet = console, epochs, quiet
        self.progress = None
        if console.is_terminal and not quiet:
            self.progress = Progress(TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"), BarColumn(),
                                     MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}  |g| {task.fields[gnorm]}"
                                                                      "  lr {task.fields[lr]}"), TimeElapsedColumn(),
                                     console=console, transient=True)
            self.task = self.progress.add_task("train", total=1, epoch=0, epochs=epochs, loss="-", gnorm="-", lr="-")

    def __call__(self, event: dict) -> None:
        kind = event["type"]
        if kind == "start":
            plan = event["plan"]
            self.console.print(f"run dir {event['run_dir']}  ·  {plan.train_rows} train / {plan.val_rows} val rows  ·  "
                               f"{plan.steps_per_epoch[-1]} steps per epoch per worker", highlight=False, soft_wrap=True)
            if self.progress:
                self.progress.start()
        elif kind == "warning":
            self.console.print(f"[yellow]warning:[/] {event['message']}", highlight=False, soft_wrap=True)
        elif kind == "resumed":
            changed = describe(event.get("changed") or [])
            if event["epoch"] >= self.epochs:  # a re-run of a finished run: say so, not "continuing at epoch 3" of 1
                line = (f"resumed from checkpoint: {event['epoch']} epochs already trained, run.epochs is {self.epochs}: "
                        "nothing to train (raise run.epochs to train on)")
                if changed:  # what the user changed is not silently ignored
                    line += f"; this job changed {changed}, which a finished run does not train with: use a new run.name"
            else:
                line = f"resumed from checkpoint: continuing at epoch {event['epoch'] + 1}"
                if changed:
                    line += f" under changed hyper-parameters: {changed} (this job's LR schedule, replayed to that point)"
            self.console.print(line, highlight=False, soft_wrap=True)
        elif kind == "step" and self.progress:
            self.progress.update(self.task, total=event["steps"], completed=event["step"], epoch=event["epoch"] + 1,
                                 loss=fmt(event[mk.LOSS]), gnorm=fmt(event[mk.GRAD_NORM]), lr=fmt(event[mk.LR], "{:.3g}"))
        elif kind == "epoch" and not self.quiet:
            m = event["metrics"]
            parts = [f"{label} {fmt(m.get(key), pattern)}" for key, label, pattern in EPOCH_COLUMNS
                     if key != mk.EPOCH]
            self.console.print(f"epoch {m[mk.EPOCH] + 1}/{self.epochs}  " + "  ".join(parts), highlight=False, soft_wrap=True)
            if m.get(mk.STOP_REASON):
                self.console.print(f"[yellow]{m[mk.STOP_REASON]}[/]")

    def close(self) -> None:
        if self.progress:
            self.progress.stop()


def summary_table(outcome) -> Table:
    colour = {"finished": "green", "early_stopped": "green", "diverged": "red", "failed": "red"}.get(outcome.status, "yellow")
    table = Table(title=f"[{colour}]{outcome.status}[/]" + (f": {outcome.reason}" if outcome.reason else ""),
                  show_header=False, title_justify="left")
    table.add_column("what", no_wrap=True)
    table.add_column("value", overflow="fold")
    final = outcome.final
    rows = [("epochs run", fmt(final.get(mk.EPOCH, -1) + 1 if final else 0, "{}")),
            ("best val accuracy", fmt(outcome.best(mk.VAL_ACCURACY, "max"))),
            ("final val accuracy", fmt(final.get(mk.VAL_ACCURACY))),
            *((f"final val accuracy ({name})", fmt(final[mk.extra_val(mk.VAL_ACCURACY, name)]))  # data.extra_val
              for name in mk.extra_val_names(final)),
            ("best val loss", fmt(outcome.best(mk.VAL_LOSS, "min"))),
            ("final train loss", fmt(final.get(mk.TRAIN_LOSS))),
            ("skipped steps", fmt(final.get(mk.SKIPPED_STEPS), "{}")),
            ("samples/s (last epoch)", fmt(final.get(mk.SAMPLES_PER_S), "{:.0f}")),
            ("checkpoint", outcome.checkpoint or "-"),
            ("run dir", outcome.run_uri or str(outcome.run_dir))]
    for key, value in rows:
        table.add_row(key, value)
    return table
