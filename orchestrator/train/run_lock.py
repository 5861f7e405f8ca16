"""One `keel run` at a time per run directory.

Re-running a `run.name` resumes it, so two runs of the same job started side by side (two terminals, a
script run twice) both trained into one directory: their epochs interleaved in metrics.jsonl and each
resumed from checkpoints the other was writing. The driver now holds an advisory lock on the run
directory while it trains; a second run finds it held and stops at once, naming the holder. The lock is
the operating system's (`flock`), so it goes with the process however that ends: no stale lock to clear.
Runs on object storage take none (there is no lock to take there).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from orchestrator.errors import BadInput

LOCK_FILE = ".keel-run.lock"


@contextmanager
def run_directory_lock(run_dir: Path | None):
    """Hold `run_dir`'s lock for the block (None: nothing to lock). Yields `claim()`, which writes who holds
    it, for the message a second run shows; a re-run that only reads the run calls nothing and writes nothing."""
    if run_dir is None:
        yield lambda: None
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 300).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise BadInput(f"run.name: {run_dir} is being trained by another keel run ({holder}); wait for it to end, "
                       "or use another run.name") from None

    def claim() -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%H:%M:%S')}".encode(), 0)

    try:
        yield claim
    finally:
        os.close(fd)  # and with it the lock
