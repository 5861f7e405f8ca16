"""One `keel run` at a time per run directory.

Re-running a `run.name` resumes it, so two runs of the same job started side by side (two terminals, a
script run twice) both trained into one directory: their epochs interleaved in metrics.jsonl and each
resumed from checkpoints the other was writing. The driver now holds an advisory lock on the run
directory while it trains; a second run finds it held and stops, naming the holder. The lock is the
operating system's (`flock`), so it goes with the process however that ends: no stale lock to clear.
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


class _RunLock:
    def __init__(self, run_dir: Path):
        self.run_dir, self.fd = run_dir, None

    def acquire(self) -> None:
        if self.fd is not None:
            return
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # not writable (preflight checks what it can: root may write where others may not)
            raise BadInput(f"run.storage_path: cannot write the run directory {self.run_dir}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 300).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise BadInput(f"run.name: {self.run_dir} is being trained by another keel run ({holder}); wait for it "
                           "to end, or use another run.name") from None
        self.fd = fd

    def claim(self) -> None:
        """Hold the lock (the directory made if need be) and write who holds it, for a second run's message."""
        self.acquire()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%H:%M:%S')}".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # and with it the lock
            self.fd = None


@contextmanager
def run_directory_lock(run_dir: Path | None):
    """For the block: an existing run directory is locked at once (a run being trained stops a second one
    here, before anything starts); yields `claim()`, which the run calls before it writes anything (it makes
    the directory of a new run, then). A re-run that only reads a finished run claims nothing, writes nothing."""
    if run_dir is None:
        yield lambda: None
        return
    lock = _RunLock(run_dir)
    try:
        if run_dir.is_dir():
            lock.acquire()
        yield lock.claim
    finally:
        lock.release()
