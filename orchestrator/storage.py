"""Run storage on a local path or on object storage (s3://bucket/prefix, gs://...), through pyarrow's
filesystems, as Ray Train itself uses them.

The endpoint and credentials come the standard AWS way (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...): pyarrow
reads them where the URI is resolved, on the driver. The resolved filesystem object is then handed to Ray
Train and to the workers (it pickles with its endpoint), so workers need no environment of their own.

On object storage the driver keeps a run's small files (config, metrics, steps, placement, report) in a
local mirror directory and uploads them after every epoch and at the end; checkpoints go straight to the
bucket through Ray Train.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from orchestrator.errors import BadInput


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def filesystem(uri: str, field: str = "run.storage_path"):
    """(pyarrow filesystem, path inside it) for a URI; a one-line BadInput naming `field` if it is not one."""
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as exc:
        raise BadInput(f"{field}: {uri}: not a storage URI pyarrow can open ({str(exc).splitlines()[0]})") from None


def check_storage(uri: str, field: str = "run.storage_path") -> None:
    """Before any worker starts: the URI parses, the endpoint answers, and the bucket exists."""
    import pyarrow.fs

    fs, path = filesystem(uri, field)
    bucket = path.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
    except OSError as exc:
        raise BadInput(f"{field}: {uri}: cannot reach the storage ({str(exc).splitlines()[0]})") from None
    if info.type == pyarrow.fs.FileType.NotFound:
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "the provider's default endpoint")
        raise BadInput(f"{field}: {uri}: bucket '{bucket}' does not exist (at {endpoint})")


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def read_text(location: str | Path):
    """A small text file's contents from a local path or a URI; None when it does not exist."""
    if not is_remote(str(location)):
        return Path(location).read_text() if Path(location).exists() else None
    import pyarrow.fs

    fs, path = filesystem(str(location), "storage")
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_text(location: str | Path, text: str) -> None:
    """Write a small text file at a local path (parents made) or a URI (one object)."""
    if not is_remote(str(location)):
        Path(location).parent.mkdir(parents=True, exist_ok=True)
        Path(location).write_text(text)
        return
    fs, path = filesystem(str(location), "storage")
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def exists(location: str | Path) -> bool:
    if not is_remote(str(location)):
        return Path(location).exists()
    import pyarrow.fs

    fs, path = filesystem(str(location), "storage")
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def upload_dir(local: Path, uri: str) -> None:
    """Copy a local directory's files to `uri` (overwriting)."""
    import pyarrow.fs

    fs, path = filesystem(uri)
    pyarrow.fs.copy_files(str(local), path, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs)


def discard_download(local: str | os.PathLike) -> None:
    """Remove a copy made by download_run or a RemoteCheckpoint (with the temporary directory around it)."""
    shutil.rmtree(Path(local).parent, ignore_errors=True)


def download_run(uri: str, skip_checkpoints: bool = True, missing_ok: bool = False) -> Path:
    """A run directory on object storage, copied to a new local directory (reports, results, and the
    driver's mirror of a run that is resumed, so its metrics files grow instead of starting over)."""
    import pyarrow.fs

    fs, path = filesystem(uri, "run directory")
    local = Path(tempfile.mkdtemp(prefix="keel-run-")) / Path(path).name
    if fs.get_file_info(path).type != pyarrow.fs.FileType.Directory:
        if not missing_ok:
            raise BadInput(f"{uri}: no such run directory")
        local.mkdir()
        return local
    for entry in fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True)):
        relative = entry.path[len(path):].lstrip("/")
        skipped = skip_checkpoints and any(part.startswith("checkpoint_") for part in relative.split("/"))
        if entry.type != pyarrow.fs.FileType.File or skipped:
            continue
        target = local / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(entry.path) as src:
            target.write_bytes(src.read())
    return local


class RemoteCheckpoint(os.PathLike):
    """A checkpoint directory on object storage that is downloaded the first time it is used as a path:
    resume lists the older checkpoints as fallbacks but fetches only the ones it has to look at."""

    def __init__(self, fs, path: str):
        self.fs, self.path, self.name, self._local = fs, path, path.rstrip("/").rsplit("/", 1)[-1], None

    def __fspath__(self) -> str:
        if self._local is None:
            import pyarrow.fs

            local = Path(tempfile.mkdtemp(prefix="keel-ckpt-")) / self.name
            local.mkdir()
            pyarrow.fs.copy_files(self.path, str(local), source_filesystem=self.fs,
                                  destination_filesystem=pyarrow.fs.LocalFileSystem())
            self._local = str(local)
        return self._local

    def discard(self) -> None:
        """Remove the downloaded copy, if any: a worker that fetched older checkpoints is killed, not exited,
        when its run ends, so nothing else would remove them."""
        if self._local is not None:
            discard_download(self._local)
            self._local = None

    def __repr__(self) -> str:
        return f"RemoteCheckpoint({self.path})"


def remote_checkpoints(fs, run_path: str) -> list[RemoteCheckpoint]:
    """A run's checkpoints on object storage, oldest first (Ray names them by timestamp)."""
    import pyarrow.fs

    entries = fs.get_file_info(pyarrow.fs.FileSelector(run_path, allow_not_found=True))
    return sorted((RemoteCheckpoint(fs, e.path) for e in entries
                   if e.type == pyarrow.fs.FileType.Directory and e.base_name.startswith("checkpoint_")),
                  key=lambda c: c.name)
