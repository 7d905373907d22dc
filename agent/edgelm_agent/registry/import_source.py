"""Read a model to import without following links: a caller names a path, the agent reads it.

The agent can read files no client can: its own signing keys, other users' files. An import
names a path, and the agent copies what is there into a blob. If that path, or any file inside
an ONNX folder, were a symbolic link, a local user could make the agent copy a file only the
agent may read into the blob store. So:

* the path named, and everything inside a folder at any depth, must be a regular file or a
  directory: a symbolic link, a device, a FIFO or a socket is refused, with its path;
* files are opened with ``O_NOFOLLOW``, each directory below the folder through its parent's
  descriptor with ``O_NOFOLLOW | O_DIRECTORY``, and the descriptor is checked again with
  ``fstat``, so a file swapped for a link between the scan and the read is refused too.

(The folders *above* the named path are the caller's own way of naming it and are resolved
normally; the directory tree under it is what the import reads.)
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from edgelm_agent.registry.errors import UnsafeSource

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
MAX_FILES = 1000
MAX_DEPTH = 4


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISREG(mode):
        return "a regular file"
    return "a special file (device, FIFO or socket)"


def _open_dir(name: str, dir_fd: int | None, shown: str) -> int:
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW, dir_fd=dir_fd)
    except OSError as exc:
        raise UnsafeSource(f"{shown} cannot be opened as a directory: {exc.strerror}") from exc


def _open_file(name: str, dir_fd: int | None, shown: str) -> BinaryIO:
    try:
        fd = os.open(name, os.O_RDONLY | _NOFOLLOW, dir_fd=dir_fd)
    except OSError as exc:  # ELOOP: the last component is a link
        raise UnsafeSource(f"{shown} cannot be read without following a link") from exc
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise UnsafeSource(f"{shown} is {_kind(mode)}; only regular files are imported")
    return os.fdopen(fd, "rb", buffering=0)


@dataclass(frozen=True)
class ImportSource:
    """A file, or a folder of files, checked to hold nothing but regular files."""

    root: Path
    is_folder: bool
    #: '/'-separated paths below ``root`` (for a file: its own name), sorted.
    members: tuple[str, ...]

    @classmethod
    def scan(cls, path: Path) -> ImportSource:
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError as exc:
            raise UnsafeSource(f"{path} does not exist") from exc
        except OSError as exc:
            raise UnsafeSource(f"cannot inspect {path}: {exc.strerror}") from exc
        if stat.S_ISREG(mode):
            return cls(path, False, (path.name,))
        if not stat.S_ISDIR(mode):
            raise UnsafeSource(
                f"{path} is {_kind(mode)}; import a regular file or a folder of them"
            )
        members: list[str] = []
        fd = _open_dir(str(path), None, str(path))
        try:
            _walk(fd, "", path, members, depth=0)
        finally:
            os.close(fd)
        return cls(path, True, tuple(sorted(members)))

    @contextlib.contextmanager
    def open(self, member: str) -> Iterator[BinaryIO]:
        """One member, read through descriptors that never follow a link."""
        if not self.is_folder:
            with _open_file(str(self.root), None, str(self.root)) as f:
                yield f
            return
        parts = member.split("/")
        fds = [_open_dir(str(self.root), None, str(self.root))]
        try:
            for i, part in enumerate(parts[:-1]):
                shown = str(self.root / "/".join(parts[: i + 1]))
                fds.append(_open_dir(part, fds[-1], shown))
            with _open_file(parts[-1], fds[-1], str(self.root / member)) as f:
                yield f
        finally:
            for fd in fds:
                os.close(fd)

    def size(self, member: str) -> int:
        with self.open(member) as f:
            return os.fstat(f.fileno()).st_size


def _walk(dir_fd: int, prefix: str, root: Path, members: list[str], *, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise UnsafeSource(f"{root / prefix} is nested more than {MAX_DEPTH} folders deep")
    for entry in sorted(os.scandir(dir_fd), key=lambda e: e.name):
        relative = f"{prefix}{entry.name}"
        shown = root / relative
        mode = entry.stat(follow_symlinks=False).st_mode
        if stat.S_ISDIR(mode):
            child = _open_dir(entry.name, dir_fd, str(shown))
            try:
                _walk(child, relative + "/", root, members, depth=depth + 1)
            finally:
                os.close(child)
        elif stat.S_ISREG(mode):
            members.append(relative)
            if len(members) > MAX_FILES:
                raise UnsafeSource(f"{root} holds more than {MAX_FILES} files")
        else:
            raise UnsafeSource(
                f"{shown} is {_kind(mode)}; a model folder may hold only regular files"
            )
