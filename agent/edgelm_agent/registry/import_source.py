"""Read a model to import through descriptors only: what was scanned is what is read.

The agent can read files no client can: its own signing keys, other users' files. An import
names a path, and the agent copies what is there into a blob. If that path, a folder above it
or any file inside an ONNX folder could be turned into a symbolic link while the import runs, a
local user could make the agent copy a file only the agent may read into the blob store. So:

* **One resolution.** The folders above the named path are the caller's way of naming it: they
  are resolved once (``realpath``), and then opened component by component from ``/`` with
  ``O_NOFOLLOW | O_DIRECTORY``, so a link swapped into one of them meanwhile fails the walk
  (``ELOOP``) instead of redirecting it. The named path itself is never followed.
* **One descriptor tree.** The folder holding the import stays open from the scan to the last
  copy, and every member is opened relative to it, folder by folder, again with
  ``O_NOFOLLOW``. Renaming a folder on the path, or swapping it for a link, changes nothing for
  a descriptor already open.
* **Same files.** Each member's ``(st_dev, st_ino)`` is recorded by the scan and checked at
  every open, so a file swapped for another (a link, a FIFO, another file) between the scan and
  a read is refused.
* **Regular files only**, at any depth: a link, a device, a FIFO or a socket is refused with its
  path. Files are opened with ``O_NONBLOCK`` and checked with ``fstat`` before anything is
  read: opening a FIFO would otherwise wait for a writer and hold a thread for ever.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from edgelm_agent.registry.errors import UnsafeSource

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
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


def _open_dir(name: str, dir_fd: int, shown: str | Path) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError as exc:
        raise UnsafeSource(f"{shown} does not exist") from exc
    except OSError as exc:  # ELOOP: a link; ENOTDIR: swapped for a file
        raise UnsafeSource(
            f"{shown} cannot be opened as a folder without following a link: {exc.strerror}"
        ) from exc


def _open_from_root(folder: str) -> int:
    """A descriptor for the absolute, link-free path ``folder``, walked from ``/``."""
    fd = os.open("/", _DIR_FLAGS)
    walked = Path("/")
    try:
        for part in Path(folder).parts[1:]:
            walked /= part
            child = _open_dir(part, fd, walked)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _lstat(name: str, dir_fd: int, shown: str | Path) -> os.stat_result:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError as exc:
        raise UnsafeSource(f"{shown} does not exist") from exc
    except OSError as exc:
        raise UnsafeSource(f"cannot inspect {shown}: {exc.strerror}") from exc


def _open_file(name: str, dir_fd: int, shown: str | Path, identity: tuple[int, int]) -> BinaryIO:
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:  # ELOOP: the file was swapped for a link
        raise UnsafeSource(f"{shown} cannot be read without following a link") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeSource(f"{shown} is {_kind(st.st_mode)}; only regular files are imported")
        if (st.st_dev, st.st_ino) != identity:
            raise UnsafeSource(f"{shown} changed since it was scanned; import it again")
        # Regular files never block; the flag only had to keep open() from waiting on a FIFO.
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb", buffering=0)


@dataclass(frozen=True)
class Member:
    """A regular file found by the scan."""

    #: '/'-separated path below the folder holding the import (for a file: its own name).
    path: str
    size: int
    #: ``(st_dev, st_ino)`` at the scan; every later open must find the same file.
    identity: tuple[int, int]


class ImportSource:
    """A file, or a folder of files, scanned to hold nothing but regular files, and read only
    through the descriptor the scan opened. Use it as a context manager: the descriptor stays
    open until the import is done."""

    def __init__(self, root: Path, base_fd: int, is_folder: bool, members: list[Member]) -> None:
        #: The path as named (made absolute), for messages.
        self.root = root
        self.is_folder = is_folder
        self._base_fd: int | None = base_fd
        self._members = {m.path: m for m in sorted(members, key=lambda m: m.path)}

    @classmethod
    def scan(cls, path: Path) -> ImportSource:
        absolute = Path(os.path.abspath(path))
        if absolute == absolute.parent:
            raise UnsafeSource(f"{path} is the root folder; name a model file or folder")
        # The folders above the named path are resolved once, here; never again.
        parent_fd = _open_from_root(os.path.realpath(absolute.parent))
        try:
            st = _lstat(absolute.name, parent_fd, path)
            if stat.S_ISREG(st.st_mode):  # the source keeps the folder's descriptor
                member = Member(absolute.name, st.st_size, (st.st_dev, st.st_ino))
                return cls(absolute, parent_fd, False, [member])
            if not stat.S_ISDIR(st.st_mode):
                raise UnsafeSource(
                    f"{path} is {_kind(st.st_mode)}; import a regular file or a folder of them"
                )
            base_fd = _open_dir(absolute.name, parent_fd, path)
        except BaseException:
            os.close(parent_fd)
            raise
        os.close(parent_fd)
        try:
            opened = os.fstat(base_fd)
            if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
                raise UnsafeSource(f"{path} changed while it was scanned; import it again")
            members: list[Member] = []
            _walk(base_fd, "", absolute, members, depth=0)
        except BaseException:
            os.close(base_fd)
            raise
        return cls(absolute, base_fd, True, members)

    def __enter__(self) -> ImportSource:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        fd, self._base_fd = self._base_fd, None
        if fd is not None:
            os.close(fd)

    @property
    def members(self) -> tuple[str, ...]:
        """The members' paths, sorted."""
        return tuple(self._members)

    def size(self, member: str) -> int:
        """The member's size when it was scanned."""
        return self._members[member].size

    @property
    def total_size(self) -> int:
        return sum(m.size for m in self._members.values())

    def shown(self, member: str) -> Path:
        """How to name a member in a message."""
        return self.root / member if self.is_folder else self.root

    @contextlib.contextmanager
    def open(self, member: str) -> Iterator[BinaryIO]:
        """One member, opened below the scanned folder without following a link, and only if
        it is still the file the scan found."""
        if self._base_fd is None:
            raise RuntimeError("the import source is closed")
        scanned = self._members[member]
        parts = member.split("/")
        opened: list[int] = []
        try:
            dir_fd = self._base_fd
            for i, part in enumerate(parts[:-1]):
                dir_fd = _open_dir(part, dir_fd, self.root / "/".join(parts[: i + 1]))
                opened.append(dir_fd)
            f = _open_file(parts[-1], dir_fd, self.shown(member), scanned.identity)
        finally:
            for fd in opened:
                os.close(fd)
        with f:
            yield f


def _walk(dir_fd: int, prefix: str, root: Path, members: list[Member], *, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise UnsafeSource(f"{root / prefix} is nested more than {MAX_DEPTH} folders deep")
    with os.scandir(dir_fd) as entries:
        listed = sorted(entries, key=lambda e: e.name)
    for entry in listed:
        relative = f"{prefix}{entry.name}"
        shown = root / relative
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            child = _open_dir(entry.name, dir_fd, shown)
            try:
                _walk(child, relative + "/", root, members, depth=depth + 1)
            finally:
                os.close(child)
        elif stat.S_ISREG(st.st_mode):
            members.append(Member(relative, st.st_size, (st.st_dev, st.st_ino)))
            if len(members) > MAX_FILES:
                raise UnsafeSource(f"{root} holds more than {MAX_FILES} files")
        else:
            raise UnsafeSource(
                f"{shown} is {_kind(st.st_mode)}; a model folder may hold only regular files"
            )
