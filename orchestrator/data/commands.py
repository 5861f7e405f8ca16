"""`keel data make` and `keel data inspect`: the data commands of the CLI."""

from __future__ import annotations

from rich.console import Console

from orchestrator.errors import BadInput


def writable_dir(path: str, flag: str) -> None:
    """The output directory, made now: one line naming the flag if it cannot be, before anything runs."""
    from pathlib import Path

    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"{flag} {path}: cannot write there ({exc.strerror})") from None


def cmd_data_make(args, console: Console) -> int:
    from orchestrator.data.generators import GENERATORS

    options = {}
    if args.rows is not None:
        if args.rows < 10:
            raise BadInput(f"--rows {args.rows}: needs at least 10 (the training and validation splits are cut from them)")
        options["rows"] = args.rows
    if args.shape:
        try:
            options["shape"] = tuple(int(v) for v in args.shape.split(","))
        except ValueError:
            raise BadInput(f"--shape {args.shape!r}: expected C,H,W like 3,32,32") from None
        if len(options["shape"]) != 3 or min(options["shape"]) < 1:
            raise BadInput(f"--shape {args.shape!r}: expected three positive sizes C,H,W like 3,32,32")
    if args.classes is not None:
        if args.classes < 2:
            raise BadInput(f"--classes {args.classes}: needs at least 2")
        options["classes"] = args.classes
    if not 0.0 <= args.missing < 1.0:
        raise BadInput(f"--missing {args.missing:g}: a fraction of cells, in [0, 1)")
    if args.missing:
        options["missing"] = args.missing
    if args.length is not None:
        if args.length < 2:
            raise BadInput(f"--length {args.length}: needs at least 2 time steps")
        options["length"] = args.length
    writable_dir(args.out, "--out")
    try:
        paths = GENERATORS[args.dataset](args.out, **options)
    except TypeError as exc:
        raise BadInput(f"keel data make {args.dataset}: {exc}") from None
    console.print("wrote " + ", ".join(str(p) for p in paths), highlight=False)
    return 0


def cmd_data_inspect(args, console: Console) -> int:
    import pyarrow as pa
    from rich.table import Table

    from orchestrator.data.scan import describe, open_dataset, scan_split

    schema = open_dataset(args.path, "path").schema
    if args.features:
        features = args.features.split(",")
    else:
        def numeric(t):
            inner = getattr(t, "value_type", t)
            return pa.types.is_floating(inner) or pa.types.is_integer(inner)
        features = [f.name for f in schema if f.name != args.label and numeric(f.type)]
    scan = scan_split(args.path, "path", features, args.label, asked_by={**{c: "--features" for c in features}, args.label: "--label"})
    table = Table(title=args.path, show_header=False, title_justify="left")
    table.add_column("what", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_row("schema", ", ".join(f"{f.name}: {f.type}" for f in schema))
    for key, value in describe(scan):
        table.add_row(key, value)
    console.print(table)
    return 0
