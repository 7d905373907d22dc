"""Content-addressed, read-only model blobs, and the staging area for partial files.

Layout under the registry directory::

    blobs/sha256/<hex>       one file per content hash, mode 0440, never rewritten
    bundles/<hex>/...        an ONNX folder, materialized as hard links to its member blobs
    staging/                 partial downloads and imports; nothing here is ever loaded

llama.cpp maps model files into memory, and a file that changes or shrinks under a mapping
kills the process with SIGBUS. So a blob appears under its final name only once complete,
fsynced and checked, and is never opened for writing again; garbage collection unlinks it,
which leaves any live mapping intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path
from typing import BinaryIO

from edgelm_agent.registry.bundle import BundleFile
from edgelm_agent.registry.errors import Cancelled, InsufficientSpace, TargetMismatch
from edgelm_protocol.repository.atomic_file import fsync_dir

CHUNK_BYTES = 4 << 20
BLOB_MODE = 0o440  # read-only, for the agent and its group: the state tree is theirs alone
Progress = Callable[[int], None]  # called with the bytes just processed


def _no_progress(n: int) -> None:
    pass


def check_cancel(cancel: threading.Event | None, what: str) -> None:
    """Raise :class:`Cancelled` if ``cancel`` is set: called between chunks, so long work
    (hashing or copying gigabytes) stops within one chunk of being asked to."""
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"{what} was cancelled")


def hash_file(
    path: Path, progress: Progress = _no_progress, cancel: threading.Event | None = None
) -> tuple[str, int]:
    """sha256 and length of a file, at disk speed (see :func:`hash_stream`)."""
    with open(path, "rb", buffering=0) as f:
        return hash_stream(f, progress, cancel)


def hash_stream(
    f: BinaryIO, progress: Progress = _no_progress, cancel: threading.Event | None = None
) -> tuple[str, int]:
    """sha256 and length of an open, unbuffered binary file; ``cancel`` stops it between
    chunks.

    The next chunk is read in a helper thread while this one is hashed; both release the GIL,
    so reading and hashing overlap instead of taking turns (one thread alternating between them
    reaches about three quarters of a cold disk's read rate).
    """
    digest = hashlib.sha256()
    length = 0
    with ThreadPoolExecutor(1, "edgelm-read") as reader:
        with contextlib.suppress(AttributeError, OSError):  # advice only; not on every OS
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        pending = reader.submit(f.read, CHUNK_BYTES)
        while chunk := pending.result():
            check_cancel(cancel, "hashing")
            pending = reader.submit(f.read, CHUNK_BYTES)
            digest.update(chunk)
            length += len(chunk)
            progress(len(chunk))
    return digest.hexdigest(), length


class BlobStore:
    def __init__(self, root: Path, *, free_margin_bytes: int = 256 << 20) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.bundles = root / "bundles"
        self.staging = root / "staging"
        self.free_margin_bytes = free_margin_bytes
        for d in (self.blobs, self.bundles, self.staging):
            d.mkdir(parents=True, exist_ok=True)

    def blob_path(self, sha256: str) -> Path:
        return self.blobs / sha256

    def bundle_path(self, sha256: str) -> Path:
        return self.bundles / sha256

    def has(self, sha256: str, length: int) -> bool:
        """Cheap presence check; :meth:`verify` is the real one."""
        try:
            return self.blob_path(sha256).stat().st_size == length
        except FileNotFoundError:
            return False

    def verify(
        self,
        sha256: str,
        length: int,
        progress: Progress = _no_progress,
        cancel: threading.Event | None = None,
    ) -> Path:
        path = self.blob_path(sha256)
        if not path.exists():
            raise TargetMismatch(f"blob {sha256[:16]}… is missing from the store")
        actual, actual_length = hash_file(path, progress, cancel)
        if actual_length != length:
            raise TargetMismatch(
                f"blob {sha256[:16]}… is {actual_length} bytes, signed length is {length}"
            )
        if actual != sha256:
            raise TargetMismatch(
                f"blob {sha256[:16]}… hashes to {actual[:16]}…; it was changed or corrupted on disk"
            )
        return path

    def ensure_space(self, needed_bytes: int) -> None:
        stat = os.statvfs(self.root)
        available = stat.f_bavail * stat.f_frsize
        if needed_bytes + self.free_margin_bytes > available:
            raise InsufficientSpace(
                needed_bytes=needed_bytes + self.free_margin_bytes,
                available_bytes=available,
                path=str(self.root),
            )

    def stored_sizes(self) -> set[int]:
        """The sizes of the blobs in the store: a cheap hint of what an import may find
        already stored, before it has hashed anything."""
        return {self.size_of(digest) for digest in self.blob_digests()}

    def commit(
        self, staged: Path, sha256: str, length: int, cancel: threading.Event | None = None
    ) -> Path:
        """Move a complete, checked staging file to its content address, read-only."""
        actual, actual_length = hash_file(staged, cancel=cancel)
        if actual != sha256 or actual_length != length:
            staged.unlink(missing_ok=True)
            raise TargetMismatch(f"staged file {staged.name} does not match {sha256[:16]}…")
        final = self.blob_path(sha256)
        os.chmod(staged, BLOB_MODE)
        with open(staged, "rb") as f:
            os.fsync(f.fileno())
        if final.exists():  # same content already stored: keep the existing inode
            staged.unlink()
        else:
            os.replace(staged, final)
            fsync_dir(self.blobs)
        return final

    def import_stream(
        self,
        opener: Callable[[], AbstractContextManager[BinaryIO]],
        label: str,
        expected: tuple[str, int],
        progress: Progress = _no_progress,
        cancel: threading.Event | None = None,
    ) -> tuple[str, int]:
        """Copy a source the caller has already hashed to ``expected`` (sha256, length);
        ``cancel`` stops it between chunks.

        Content already stored is not copied again (an agent started with the same
        ``--model`` at every boot does this each time). The copy is checked against
        ``expected`` by :meth:`commit`, which also catches a source that changed since it was
        hashed.
        """
        sha256, length = expected
        if self.has(sha256, length):
            progress(length)
            return sha256, length
        self.ensure_space(length)
        staged = self.staging / f"import-{os.getpid()}-{sha256}"
        try:
            with opener() as src, open(staged, "wb") as out:
                while chunk := src.read(CHUNK_BYTES):
                    check_cancel(cancel, f"copying {label}")
                    out.write(chunk)
                    progress(len(chunk))
            self.commit(staged, sha256, length, cancel)
        finally:
            staged.unlink(missing_ok=True)
        return sha256, length

    def import_bytes(self, data: bytes) -> tuple[str, int]:
        sha256 = hashlib.sha256(data).hexdigest()
        if not self.has(sha256, len(data)):
            staged = self.staging / f"bytes-{os.getpid()}-{sha256}"
            staged.write_bytes(data)
            self.commit(staged, sha256, len(data))
        return sha256, len(data)

    def materialize_bundle(self, bundle_sha: str, files: Iterable[BundleFile]) -> Path:
        """Lay out a bundle's folder as hard links to its verified member blobs.

        Built beside the final name and renamed into place, so a half-built folder is never
        seen under ``bundles/``.
        """
        final = self.bundle_path(bundle_sha)
        if final.is_dir():
            return final
        building = self.staging / f"bundle-{os.getpid()}-{bundle_sha}"
        shutil.rmtree(building, ignore_errors=True)
        for member in files:
            target = building / member.path
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(self.blob_path(member.sha256), target)
        os.replace(building, final)
        fsync_dir(self.bundles)
        return final

    def remove_blob(self, sha256: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.blob_path(sha256).unlink()

    def remove_bundle(self, sha256: str) -> None:
        shutil.rmtree(self.bundle_path(sha256), ignore_errors=True)

    def blob_digests(self) -> set[str]:
        return {p.name for p in self.blobs.iterdir() if not p.name.startswith(".")}

    def bundle_digests(self) -> set[str]:
        return {p.name for p in self.bundles.iterdir() if p.is_dir()}

    def size_of(self, sha256: str) -> int:
        try:
            return self.blob_path(sha256).stat().st_size
        except FileNotFoundError:
            return 0

    def clear_staging(self, keep: Callable[[Path], bool] = lambda p: False) -> None:
        """Remove leftovers of interrupted imports; partial downloads are kept to resume."""
        for entry in self.staging.iterdir():
            if keep(entry):
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
