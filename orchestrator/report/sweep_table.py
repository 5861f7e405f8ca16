"""Trial tables for `keel sweep` (live) and `keel results` (ranked)."""

from __future__ import annotations

from rich.table import Table

from orchestrator.report.console import fmt

STATUS_STYLE = {"diverged": "red", "ERROR": "red", "TERMINATED": "green", "RUNNING": "yellow", "PENDING": "dim"}


def trial_table(rows, metric: str, title: str = "") -> Table:
    table = Table(title=title or None, title_justify="left")
    for header in ("trial", "status", "params", metric, "reports", "note"):
        table.add_column(header, overflow="fold", no_wrap=header in ("trial", "status"))
    for r in rows:
        params = ", ".join(f"{k.split('.')[-1]}={fmt(v)}" for k, v in r.config.items())
        style = STATUS_STYLE.get(r.status, "")
        table.add_row(r.trial_id, f"[{style}]{r.status}[/]" if style else r.status, params, fmt(r.metric),
                      str(r.iterations), r.reason or guard_note(r.events))
    return table


def guard_note(events: int) -> str:
    """A finished trial's note: how often its guards acted over its run."""
    return f"{events} guard event{'' if events == 1 else 's'}" if events else ""


class TrialLines:
    """The live view without a terminal: one line each time a trial's state changes. Tune calls back with every
    trial's row; the line is the updated trial's, and a repeat of the same state (a trial's last result and
    its completion) is not printed twice."""

    def __init__(self, metric: str):
        self.metric, self.shown = metric, {}

    def new(self, rows) -> list[str]:
        lines = []
        for r in rows:
            line = (f"{r.trial_id} {r.status} {self.metric}={r.metric} reports={r.iterations}"
                    + (f" ({r.reason})" if r.reason else ""))
            if self.shown.get(r.trial_id) != line:
                self.shown[r.trial_id] = line
                lines.append(line)
        return lines
