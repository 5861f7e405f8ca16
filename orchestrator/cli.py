"""`keel`: thin on purpose. Parse, load the spec, call a library function, print.

Exit codes: 0 ok, 1 the run failed or diverged, 2 bad input (nothing started).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from rich.console import Console

from orchestrator import metric_keys as mk
from orchestrator.cluster.commands import cmd_cluster_validate, cmd_jobs, cmd_submit
from orchestrator.data.commands import cmd_data_inspect, cmd_data_make, writable_dir
from orchestrator.errors import BadInput, RunFailed


def cmd_run(args, console: Console) -> int:
    from orchestrator.report.console import RunDisplay, summary_table
    from orchestrator.spec import parse_spec
    from orchestrator.spec_text import apply_overrides, read_yaml
    from orchestrator.sweep.spec import is_sweep_tree
    from orchestrator.train.driver import run_job
    from orchestrator.train.planning import preflight

    tree = read_yaml(args.job)  # read once: a sweep spec is refused, a job spec parsed from the same tree
    if is_sweep_tree(tree):
        raise BadInput(f"{args.job}: this is a sweep spec (it has base: and search:); run it with keel sweep")
    spec = parse_spec(apply_overrides(tree, list(args.overrides)), str(args.job))
    if args.print_config:
        console.print(spec.to_yaml(), highlight=False, markup=False)
        return 0
    plan = preflight(spec, generate=False)  # fail fast on bad input before any side effect; run_job reuses it
    display = RunDisplay(console, spec.run.epochs, quiet=args.quiet)
    try:
        outcome = run_job(spec, on_event=display, verbose=args.verbose, dashboard=args.dashboard, plan=plan)
    finally:
        display.close()
    for warning in outcome.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    if outcome.drift is not None:
        from orchestrator.data.drift import summary_line
        console.print(summary_line(outcome.drift), highlight=False, soft_wrap=True)
    if outcome.status == "interrupted":
        Console(stderr=True).print(f"keel: {outcome.reason}: keel run {args.job} {' '.join(args.overrides)}".rstrip(),
                                   highlight=False, markup=False, soft_wrap=True)
        return 130
    console.print(summary_table(outcome))
    if outcome.stability:
        console.print(f"stability: {outcome.stability['summary']}", highlight=False, soft_wrap=True)
    if not outcome.ok:
        raise RunFailed(f"run {outcome.status}: {outcome.reason}")
    return 0


def cmd_sweep(args, console: Console) -> int:
    from rich.live import Live

    from orchestrator.report.sweep_table import TrialLines, trial_table
    from orchestrator.spec import parse_spec
    from orchestrator.sweep.spec import load_sweep
    from orchestrator.train.planning import preflight

    sweep, base = load_sweep(args.sweep, args.overrides)
    from orchestrator.storage import check_storage, is_remote
    if is_remote(sweep.storage_path):  # the URI, the endpoint, the bucket: before Ray or any trial starts
        check_storage(sweep.storage_path, "storage_path")
    base_spec = parse_spec(base, args.sweep)
    base_plan = preflight(base_spec, generate=True, resumes=False)  # the base job's data, before any trial or Ray starts; trials reuse its scan
    from orchestrator.sweep.driver import logger_callbacks, run_sweep
    logger_callbacks(sweep)  # a missing mlflow/wandb is bad input, found before the sweep starts
    live = Live(console=console, auto_refresh=False) if console.is_terminal and not args.quiet else None
    lines = TrialLines(sweep.metric)

    def show(rows):
        if live is not None:
            live.update(trial_table(rows, sweep.metric, f"sweep {sweep.name}"), refresh=True)
        elif not args.quiet:
            for line in lines.new(rows):
                console.print(line, highlight=False, soft_wrap=True)

    if live is not None:
        live.start()
    try:
        outcome = run_sweep(sweep, base, on_result=show, base_spec=base_spec, base_plan=base_plan)
    finally:
        if live is not None:
            live.stop()
    if outcome.unfinished:  # Ctrl-C: Tune saved the experiment state
        console.print(trial_table(outcome.rows, sweep.metric, f"interrupted: {outcome.exp_dir}"))
        Console(stderr=True).print(f"keel: sweep interrupted with {outcome.unfinished} trials unfinished; re-run to resume: "
                                   f"keel sweep {args.sweep} {' '.join(args.overrides)}".rstrip(),
                                   highlight=False, markup=False, soft_wrap=True)
        return 130
    return print_results(outcome, sweep.metric, console)


def print_results(outcome, metric: str, console: Console) -> int:
    from orchestrator.report.sweep_table import trial_table

    console.print(trial_table(outcome.rows, metric, f"results: {outcome.exp_dir}"))
    if outcome.best is None:
        raise RunFailed("no trial finished healthy")
    console.print(f"best: {outcome.best.trial_id} {metric}={outcome.best.metric:.4g} {outcome.best.config}", highlight=False)
    if outcome.best_job:
        console.print(f"best config as a job: {outcome.best_job}  (keel run {outcome.best_job})", highlight=False, soft_wrap=True)
    return 0


def cmd_results(args, console: Console) -> int:
    import yaml

    from orchestrator.sweep.driver import summarize
    from orchestrator.sweep.spec import SweepSpec

    from orchestrator.storage import is_remote, join, read_text

    from pathlib import Path
    exp = args.exp_dir.rstrip("/") if is_remote(args.exp_dir) else Path(args.exp_dir)  # a directory or s3://...
    metric, mode = args.metric, args.mode
    saved = read_text(join(str(exp), "keel_sweep.yaml"))
    if saved is not None:
        sweep = SweepSpec.model_validate(yaml.safe_load(saved))
        metric, mode = metric or sweep.metric, mode or sweep.mode
    outcome = summarize(exp, metric or mk.VAL_ACCURACY, mode or "max")
    if args.metric and outcome.reported and args.metric not in outcome.reported:
        known = sorted(k for k in outcome.reported if k.startswith(("val_", "train_")))
        raise BadInput(f"--metric {args.metric}: no trial reported it (they report {', '.join(known)})")
    if args.json:  # for scripts: every trial, the best, and the best config as a job
        import json
        from dataclasses import asdict

        print(json.dumps({"exp_dir": str(outcome.exp_dir), "metric": metric or mk.VAL_ACCURACY, "mode": mode or "max",
                          "trials": [asdict(r) for r in outcome.rows],
                          "best": asdict(outcome.best) if outcome.best else None,
                          "best_job": str(outcome.best_job) if outcome.best_job else None}, indent=1, default=str))
        return 0 if outcome.best is not None else 1
    return print_results(outcome, metric or mk.VAL_ACCURACY, console)


def cmd_report(args, console: Console) -> int:
    from pathlib import Path

    from orchestrator.report.html import run_report, sweep_report

    from orchestrator.storage import download_run, is_remote

    path = download_run(args.path) if is_remote(args.path) else Path(args.path)  # a copy, without checkpoints
    if not path.is_dir():
        raise BadInput(f"{path}: no such directory")
    page, text = (sweep_report if (path / "keel_sweep.yaml").exists() else run_report)(path)
    console.print(text, highlight=False, soft_wrap=True)
    console.print(f"report: {page}", highlight=False, soft_wrap=True)
    return 0


def cmd_validate(args, console: Console) -> int:
    from orchestrator.spec import load_spec, parse_spec
    from orchestrator.sweep.spec import is_sweep_file, load_sweep
    from orchestrator.train.planning import preflight

    if is_sweep_file(args.job):
        sweep, base = load_sweep(args.job, args.overrides)
        preflight(parse_spec(base, args.job), generate=False, resumes=False)
        console.print(f"{args.job}: ok (sweep over {', '.join(sweep.search)}, {sweep.scheduler.kind}, "
                      f"{sweep.num_samples} samples)", highlight=False)
        return 0
    spec = load_spec(args.job, args.overrides)
    plan = preflight(spec, generate=False)
    rows = "will be generated" if plan.train_rows < 0 else f"{plan.train_rows} train / {plan.val_rows} val rows"
    if any(plan.dropped_rows.values()):
        rows += ", dropping " + ", ".join(f"{n} bad {split} rows" for split, n in plan.dropped_rows.items() if n)
    console.print(f"{args.job}: ok ({spec.model.kind}, {spec.scaling.num_workers} workers, {rows})", highlight=False)
    if plan.drift is not None:  # fine-tuning: how far the new data is from the checkpoint's
        from orchestrator.data.drift import summary_line
        console.print(summary_line(plan.drift), highlight=False, soft_wrap=True)
    return 0


def cmd_check(args, console: Console) -> int:
    from orchestrator.check import check_table, run_check
    from orchestrator.spec import load_spec

    report = run_check(load_spec(args.job, args.overrides), steps=args.steps,
                       say=lambda message: console.print(f"[dim]{message}[/dim]", highlight=False))
    console.print(check_table(report))
    for note in report.notes:
        console.print(f"note: {note}", highlight=False)
    failure = report.first_failure
    if failure is None:
        console.print(f"{args.job}: distributed-correct (1 worker x N*b = N workers x b, replicas, determinism, resume)",
                      highlight=False)
        return 0
    console.print(f"{args.job}: MISMATCH in {failure.name}: {failure.detail}\nlikely cause: {failure.cause}", highlight=False)
    return 1


def cmd_spec(args, console: Console) -> int:
    from orchestrator.spec_text import field_reference

    print(spec_reference_markdown(field_reference()))
    return 0


def spec_reference_markdown(rows) -> str:
    lines = ["| field | default | meaning |", "|---|---|---|"]
    for name, default, text in rows:
        lines.append(f"| `{name}` | {('`' + default + '`') if default else ''} | {text} |")
    return "\n".join(lines)


def cmd_stress(args, console: Console) -> int:
    from orchestrator.stress.scenarios import BY_NAME

    names = args.scenarios.split(",") if args.scenarios else list(BY_NAME)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise BadInput(f"--scenarios: unknown scenario {unknown[0]!r} (choose from {', '.join(BY_NAME)})")
    for flag, value in (("--seeds", args.seeds), ("--epochs", args.epochs), ("--lstm-epochs", args.lstm_epochs),
                        ("--transformer-epochs", args.transformer_epochs)):
        if value < 1:
            raise BadInput(f"{flag} {value}: needs at least 1")
    writable_dir(args.out, "--out")
    from pathlib import Path

    from orchestrator.stress.runner import run_stress

    def show(r) -> None:
        acc = f"{r.accuracy:.3f}" if r.accuracy is not None else "-"
        console.print(f"{r.scenario:>16} {r.profile:<9} acc {acc:>6}  {'DIVERGED' if r.diverged else r.status:<9} "
                      f"{r.seconds:6.1f} s", highlight=False)
    epochs = {"digits": args.epochs, "lstm": args.lstm_epochs, "transformer": args.transformer_epochs}
    summary = run_stress(Path(args.out), names, epochs, seeds=args.seeds, on_run=show)
    console.print((Path(args.out) / "stress.md").read_text(), highlight=False, markup=False)
    console.print(f"wrote {args.out}/stress.json, stress.md, stress_losses.png", highlight=False)
    return 0 if summary["scenarios"] else 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keel", description="Stable data-parallel PyTorch training on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train a job (embedded local Ray unless scaling.address is set)")
    run.add_argument("job", help="job spec YAML")
    run.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. optimizer.lr=0.05")
    run.add_argument("--print-config", action="store_true", help="print the resolved spec and exit")
    run.add_argument("--quiet", action="store_true", help="no live bar or per-epoch lines; summary only")
    run.add_argument("--verbose", action="store_true", help="show Ray's and the workers' logs")
    run.add_argument("--dashboard", action="store_true", help="also start Ray's dashboard on 127.0.0.1")
    run.set_defaults(func=cmd_run)

    sweep = sub.add_parser("sweep", help="run a Ray Tune sweep over a job; divergent trials are stopped at once")
    sweep.add_argument("sweep", help="sweep spec YAML")
    sweep.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the sweep spec")
    sweep.add_argument("--quiet", action="store_true")
    sweep.set_defaults(func=cmd_sweep)

    stress = sub.add_parser("stress", help="each stress scenario in a plain loop and with Keel's defaults: table + loss PNG")
    stress.add_argument("--scenarios", help="comma-separated subset (default: all)")
    stress.add_argument("--seeds", type=int, default=2, help="seeds per scenario and profile (mean and range reported)")
    stress.add_argument("--epochs", type=int, default=8, help="epochs of the digits scenarios")
    stress.add_argument("--lstm-epochs", type=int, default=4, help="epochs of the LSTM scenario")
    stress.add_argument("--transformer-epochs", type=int, default=10, help="epochs of the transformer scenarios")
    stress.add_argument("--out", default="runs/stress", help="output directory")
    stress.set_defaults(func=cmd_stress)

    results = sub.add_parser("results", help="re-read a finished or interrupted sweep")
    results.add_argument("exp_dir")
    results.add_argument("--metric")
    results.add_argument("--mode", choices=["min", "max"])
    results.add_argument("--json", action="store_true", help="machine-readable output")
    results.set_defaults(func=cmd_results)

    report = sub.add_parser("report", help="HTML report and PNG plots for a run directory or a sweep directory")
    report.add_argument("path", help="a run directory (runs/NAME) or a sweep's experiment directory")
    report.set_defaults(func=cmd_report)

    validate = sub.add_parser("validate", help="check a job spec and its data without running it")
    validate.add_argument("job")
    validate.add_argument("overrides", nargs="*")
    validate.set_defaults(func=cmd_validate)

    check = sub.add_parser("check", help="prove a job is distributed-correct on the local Ray: 1 worker x N*b vs N x b, "
                                         "replicas, determinism, resume (exit 1 at a mismatch)")
    check.add_argument("job")
    check.add_argument("overrides", nargs="*")
    check.add_argument("--steps", type=int, default=20, help="steps per run (even; the resume check stops half-way)")
    check.set_defaults(func=cmd_check)

    spec = sub.add_parser("spec", help="print the job spec reference (every field, default and meaning)")
    spec.set_defaults(func=cmd_spec)

    submit = sub.add_parser("submit", help="run a job on a Ray cluster through Ray Jobs")
    submit.add_argument("job")
    submit.add_argument("overrides", nargs="*")
    submit.add_argument("--address", help="the cluster's dashboard URL (default $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS or http://127.0.0.1:8265)")
    submit.add_argument("--no-wait", action="store_true", help="print the submission id and return")
    submit.add_argument("--working-dir", default=".", help="directory uploaded as the job's working directory (default: .)")
    submit.add_argument("--runtime-env-json", help='extra runtime env as JSON, e.g. \'{"env_vars": {"NCCL_DEBUG": "INFO"}}\'')
    submit.add_argument("--submission-id", help="the job's id (default keel-RUN-TIMESTAMP)")
    submit.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the driver (keel run) on the cluster")
    submit.add_argument("--entrypoint-num-gpus", type=float, help="GPUs reserved for the driver on the cluster")
    submit.set_defaults(func=cmd_submit)

    jobs_parser = sub.add_parser("jobs", help="list, inspect and stop submitted jobs")
    jobs_sub = jobs_parser.add_subparsers(dest="jobs_command", required=True)
    for name, text in [("list", "all jobs"), ("status", "one job's status"), ("logs", "one job's logs"), ("stop", "stop a job")]:
        p = jobs_sub.add_parser(name, help=text)
        if name != "list":
            p.add_argument("id", help="submission id")
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="stream until the job ends")
        if name in ("list", "status"):
            p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument("--address")
        p.set_defaults(func=cmd_jobs)

    cluster = sub.add_parser("cluster", help="cluster config").add_subparsers(dest="cluster_command", required=True)
    cvalidate = cluster.add_parser("validate", help="check a cluster.yaml (Ray's schema) or a KubeRay RayJob offline")
    cvalidate.add_argument("config")
    cvalidate.set_defaults(func=cmd_cluster_validate)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    make = data.add_parser("make", help="write a built-in dataset as Parquet")
    make.add_argument("dataset", choices=["digits", "digits_shifted", "synthetic", "tabular", "sequence", "tokens", "graphs"])
    make.add_argument("--out", required=True, help="output directory")
    make.add_argument("--rows", type=int, help="rows in total (synthetic, tabular, sequence, tokens, graphs)")
    make.add_argument("--shape", help="synthetic: C,H,W (default 3,32,32)")
    make.add_argument("--classes", type=int, help="number of classes")
    make.add_argument("--missing", type=float, default=0.0, help="tabular: fraction of NaN cells")
    make.add_argument("--length", type=int, help="sequence, tokens: time steps per sequence (default 32, 16)")
    make.set_defaults(func=cmd_data_make)
    inspect = data.add_parser("inspect", help="schema, rows, class balance and NaN counts of a Parquet file")
    inspect.add_argument("path")
    inspect.add_argument("--features", help="feature column(s), comma-separated (default: every numeric column but the label)")
    inspect.add_argument("--label", default="label")
    inspect.set_defaults(func=cmd_data_inspect)
    return parser


def beside_the_job_file(message: str, job: str | None) -> str:
    """A hint for the commonest missing file: a relative path written from the job file's directory, with keel
    run from another one (paths are read from the current directory, as a shell reads them)."""
    missing = re.match(r"^[\w.]+: (.+): no such file or directory$", message)
    if not missing or not job or not Path(job).is_file():
        return ""
    try:
        relative = Path(missing.group(1)).relative_to(Path.cwd())
    except ValueError:  # written as an absolute path
        return ""
    job_dir = Path(job).resolve().parent
    if not (job_dir / relative).exists():
        return ""
    return (f" (paths are read from the current directory; {relative} is in the job file's directory: run keel "
            f"from {job_dir}, or write the path from here)")


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """argparse, with overrides also accepted after an option (`keel run job.yaml --quiet optimizer.lr=0.1`):
    argparse fills a `*` positional once, with the job, and calls what follows an option unrecognized."""
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    from orchestrator.report.console import output_console

    args = parse_command_line(build_parser(), argv)
    console = output_console()
    try:
        return args.func(args, console)
    except BadInput as exc:
        message = str(exc) + beside_the_job_file(str(exc), getattr(args, "job", None))
        Console(stderr=True).print(f"keel: error: {message}", highlight=False, markup=False, soft_wrap=True)
        return 2
    except RunFailed as exc:
        Console(stderr=True).print(f"keel: {exc}", highlight=False, markup=False, soft_wrap=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
