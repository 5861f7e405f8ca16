"""Helpers shared by tests (import from here, not from conftest)."""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _gloo_entry(rank: int, fn: Callable[[int], dict], init_file: str, out_dir: str, world: int) -> None:
    # a collective one rank never joins fails in a minute, not gloo's default 30: a hang is a test failure
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        result = fn(rank)
        dist.barrier()
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def on_gloo_ranks(fn: Callable[[int], dict], world: int, tmp: Path) -> list[dict]:
    """Run `fn(rank)` (a module-level function) in `world` real processes joined by a gloo process
    group; return each rank's dict, rank order. The processes are forked from a clean fork server that
    has imported what the ranks import (benchmarks.common.start_ranks)."""
    from benchmarks.common import start_ranks

    tmp.mkdir(parents=True, exist_ok=True)
    start_ranks(_gloo_entry, (fn, str(tmp / "init"), str(tmp), world), world, ["orchestrator.train.loop", "tests.helpers"])
    return [torch.load(tmp / f"{r}.pt", weights_only=False) for r in range(world)]


# Many CLI cases in ONE fresh interpreter (a launch per case costs ~2 s of suite time each): every case's
# stderr and exit code, and at the end whether anything imported Ray.
CLI_PROBE = """
import contextlib, io, json, sys, traceback
from orchestrator.cli import main
results = {}
for case, argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except BaseException:  # a traceback is what a user would see: the case fails, the others still run
            traceback.print_exc()
            rc = "traceback"
    results[case] = {"rc": rc, "stderr": err.getvalue()}
print(json.dumps({"results": results, "ray_imported": "ray" in sys.modules}))
"""


def cli_cases(argvs: list[tuple[str, list[str]]], cwd: Path) -> dict:
    """Run `keel` argv per case in one fresh interpreter: {"results": {case: {rc, stderr}}, "ray_imported"}."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", CLI_PROBE, json.dumps(argvs)], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cli_here(capsys, *argv: str) -> tuple[int, str, str]:
    """`keel ARGV` in this process (on the suite's Ray, if the command starts one): exit code, stdout, stderr."""
    from orchestrator.cli import main

    capsys.readouterr()
    rc = main(list(argv))
    said = capsys.readouterr()
    return rc, said.out, said.err


def job_tree(digits_dir: Path, storage: Path, name: str, **sections) -> dict:
    """A small digits job as a dict; `sections` replace or extend the defaults per section."""
    tree = {
        "model": {"kind": "resnet", "channels": [16, 32], "blocks_per_stage": 1, "dropout": 0.0},
        "data": {"train": str(digits_dir / "train.parquet"), "val": str(digits_dir / "val.parquet"),
                 "shape": [1, 8, 8], "num_classes": 10, "batch_size": 32},
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        "schedule": {"kind": "cosine", "warmup_epochs": 1},
        "scaling": {"num_workers": 2},
        "run": {"name": name, "storage_path": str(storage), "epochs": 2},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            tree[key] = {**tree[key], **value}
        else:
            tree[key] = value
    return tree


def sweep_file(tmp_path, digits_dir, name, lrs, **extra) -> Path:
    """A sweep YAML over optimizer.lr (a grid) of a small MLP digits job; `extra` replaces sweep fields."""
    base = job_tree(digits_dir, tmp_path, "base", model={"kind": "mlp", "hidden": [64]},
                    stability={"clip": {"mode": "none"}, "spike": {"enabled": False}},
                    run={"name": "base", "epochs": 3})
    tree = {"name": name, "storage_path": str(tmp_path / "sweeps"), "base": base,
            "search": {"optimizer.lr": {"grid": lrs}}, "metric": "val_accuracy", "mode": "max", "num_samples": 1,
            "scheduler": {"kind": "fifo"}, "resources": {"workers_per_trial": 1, "cpus_per_worker": 0.5}, **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@contextlib.contextmanager
def s3_server():
    """moto's standalone S3 server on a free 127.0.0.1 port, stopped at exit; yields its endpoint URL."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("moto's S3 server did not start")
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)
