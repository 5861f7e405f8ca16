"""`keel`: thin on purpose. Parse, load the spec, call a library function, print.

Exit codes: 0 ok, 1 the run failed or diverged, 2 bad input (nothing started).
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from orchestrator.errors import BadInput, RunFailed


def cmd_run(args, console: Console) -> int:
    from orchestrator.report.console import RunDisplay, summary_table
    from orchestrator.spec import load_spec
    from orchestrator.train.driver import preflight, run_job

    spec = load_spec(args.job, args.overrides)
    if args.print_config:
        console.print(spec.to_yaml(), highlight=False, markup=False)
        return 0
    preflight(spec, generate=False)  # fail fast on bad input before any side effect
    display = RunDisplay(console, spec.run.epochs, quiet=args.quiet)
    try:
        outcome = run_job(spec, on_event=display, verbose=args.verbose)
    finally:
        display.close()
    console.print(summary_table(outcome))
    if not outcome.ok:
        raise RunFailed(f"run {outcome.status}: {outcome.reason}")
    return 0


def cmd_validate(args, console: Console) -> int:
    from orchestrator.spec import load_spec
    from orchestrator.train.driver import preflight

    spec = load_spec(args.job, args.overrides)
    plan = preflight(spec, generate=False)
    rows = "will be generated" if plan.train_rows < 0 else f"{plan.train_rows} train / {plan.val_rows} val rows"
    console.print(f"{args.job}: ok ({spec.model.kind}, {spec.scaling.num_workers} workers, {rows})", highlight=False)
    return 0


def cmd_spec(args, console: Console) -> int:
    from orchestrator.spec import field_reference

    print(spec_reference_markdown(field_reference()))
    return 0


def spec_reference_markdown(rows) -> str:
    lines = ["| field | default | meaning |", "|---|---|---|"]
    for name, default, text in rows:
        lines.append(f"| `{name}` | {('`' + default + '`') if default else ''} | {text} |")
    return "\n".join(lines)


def cmd_data_make(args, console: Console) -> int:
    from orchestrator.data.generators import GENERATORS

    paths = GENERATORS[args.dataset](args.out)
    console.print("wrote " + ", ".join(str(p) for p in paths), highlight=False)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keel", description="Stable data-parallel PyTorch training on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train a job (embedded local Ray unless scaling.address is set)")
    run.add_argument("job", help="job spec YAML")
    run.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. optimizer.lr=0.05")
    run.add_argument("--print-config", action="store_true", help="print the resolved spec and exit")
    run.add_argument("--quiet", action="store_true", help="no live bar or per-epoch lines; summary only")
    run.add_argument("--verbose", action="store_true", help="show Ray's and the workers' logs")
    run.set_defaults(func=cmd_run)

    validate = sub.add_parser("validate", help="check a job spec and its data without running it")
    validate.add_argument("job")
    validate.add_argument("overrides", nargs="*")
    validate.set_defaults(func=cmd_validate)

    spec = sub.add_parser("spec", help="print the job spec reference (every field, default and meaning)")
    spec.set_defaults(func=cmd_spec)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    make = data.add_parser("make", help="write a built-in dataset as Parquet")
    make.add_argument("dataset", choices=["digits"])
    make.add_argument("--out", required=True, help="output directory")
    make.set_defaults(func=cmd_data_make)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=False)
    try:
        return args.func(args, console)
    except BadInput as exc:
        Console(stderr=True).print(f"keel: error: {exc}", highlight=False, markup=False, soft_wrap=True)
        return 2
    except RunFailed as exc:
        Console(stderr=True).print(f"keel: {exc}", highlight=False, markup=False, soft_wrap=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
