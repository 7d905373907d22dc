"""Write files the only way the state directory allows: temp file, fsync, rename.

A crash (kill -9, power cut) at any point leaves either the old content or the new, never a
mix, because ``os.replace`` within one directory is atomic and the data is on disk before it.

Files are 0640 unless the caller says otherwise: readable by the owner's group, never by other
users (the agent's state directory promises that; a file meant for everyone, such as a
repository's public metadata, asks for 0644 explicitly).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o640) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
