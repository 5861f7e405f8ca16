"""What `keel submit` uploads, decided and measured before anything leaves the machine.

The working directory travels as the job's runtime env. Ray refuses a package over 100 MiB with an
HTTP 413 after the upload, so Keel packages it first with Ray's own packaging (the same excludes and
.gitignore rules), prints its size and largest entries, and refuses it in one line when it is too big.
Every virtualenv is left behind, whatever its name (a directory holding `pyvenv.cfg`), and so are
version control, caches, run outputs and anything that looks like a secret.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import BadInput

RAY_LIMIT_BYTES = 100 * 1024 * 1024  # Ray's maximum request body for a working_dir package
EXCLUDES = [".git", ".venv", "venv", "env", "runs", "**/__pycache__", "*.pyc", ".pytest_cache", ".mypy_cache",
            ".ruff_cache", ".ipynb_checkpoints", ".tox", "node_modules", "*.egg-info",
            ".env", ".env.*", "*.pem", "*.key", "id_rsa*", ".ray", "*.token", "auth_token", ".netrc"]
SKIP_WALK = {".git", "node_modules", "__pycache__"}


def virtualenvs(root: Path) -> list[str]:
    """Relative paths of every directory under `root` that holds a pyvenv.cfg (a virtualenv/venv)."""
    found = []
    for current, dirs, files in os.walk(root):
        if "pyvenv.cfg" in files:
            found.append(Path(current).relative_to(root).as_posix())
            dirs.clear()  # nothing inside a virtualenv is needed
            continue
        dirs[:] = [d for d in dirs if d not in SKIP_WALK]
    return [f for f in found if f != "."]


def excludes_for(root: Path) -> list[str]:
    return EXCLUDES + [f"/{venv}" for venv in virtualenvs(root)]


@dataclass
class UploadPlan:
    workdir: Path
    excludes: list[str]
    size: int                            # bytes of the zip Ray would upload
    files: int
    largest: list[tuple[str, int]]       # (path, compressed bytes), largest first

    def summary(self, top: int = 3) -> str:
        biggest = ", ".join(f"{name} {human(size)}" for name, size in self.largest[:top])
        return f"uploading {self.workdir} ({human(self.size)}, {self.files} files; largest: {biggest or '-'})"


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def plan_upload(workdir: str | Path, limit: int = RAY_LIMIT_BYTES) -> UploadPlan:
    """Package `workdir` as Ray would, measure it, and refuse (BadInput) a package over `limit`."""
    from ray._private.runtime_env.packaging import create_package

    root = Path(workdir).resolve()
    if not root.is_dir():
        raise BadInput(f"--working-dir {workdir}: not a directory")
    excludes = excludes_for(root)
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "package.zip"
        create_package(str(root), target, include_gitignore=True, excludes=excludes)
        size = target.stat().st_size
        with zipfile.ZipFile(target) as archive:
            entries = [(i.filename, i.compress_size) for i in archive.infolist() if not i.is_dir()]
    largest = sorted(entries, key=lambda e: -e[1])[:5]
    plan = UploadPlan(root, excludes, size, len(entries), largest)
    if size > limit:
        biggest = ", ".join(f"{name} ({human(s)})" for name, s in largest[:3])
        raise BadInput(f"--working-dir {root}: the upload would be {human(size)}, over Ray's {human(limit)} limit; "
                       f"largest: {biggest}. Add them to .gitignore or move them out")
    return plan
