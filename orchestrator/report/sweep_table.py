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
                      str(r.iterations), r.reason or (f"{r.events} guard events" if r.events else ""))
    return table
