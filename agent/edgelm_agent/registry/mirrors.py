"""Where repository files come from: HTTP(S) mirrors and local folders, tried in order.

A mirror is a base URL (``https://cp.example/repo``) or a folder (``/media/usb/repo``, the
sideload case). Both serve the same tree (``metadata/…``, ``targets/…``) and get the same
checks, because trust comes from the signatures, never from where the bytes came from.

* :class:`MirrorFetcher` plugs into python-tuf's ngclient for metadata.
* :func:`download_resumable` fetches model files with HTTP Range requests into a partial file,
  so an interrupted download resumes where it stopped; at most the chunk in flight is lost.

The fleet's own repository is a :class:`PinnedMirror`: an ``https://`` URL that carries the CA
bundle its server must chain to (the fleet CA from the enrollment), so it is verified against
that alone, never the system's trust store. It is a ``str``, so it passes with its trust
intact through code that only knows mirror strings (the registry, python-tuf's updater), and
:func:`subfolder` keeps it pinned. Other ``https://`` mirrors (a site's cache with a public
certificate) use the system's store.
"""

from __future__ import annotations

import errno
import os
import shutil
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self

import urllib3
from tuf.api import exceptions as tuf_exceptions
from tuf.ngclient.fetcher import FetcherInterface

from edgelm_agent.registry.errors import (
    DownloadError,
    DownloadRefused,
    InstallCancelled,
    InsufficientSpace,
    TargetMismatch,
)

MIRROR_URL = "edgelm-mirror:///"  # what ngclient sees; the fetcher maps it onto each mirror
CHUNK_BYTES = 1 << 20


def _is_http(mirror: str) -> bool:
    return mirror.startswith(("http://", "https://"))


def _join(mirror: str, relative: str) -> str:
    return mirror.rstrip("/") + "/" + relative


class PinnedMirror(str):
    """An ``https://`` mirror whose server certificate must chain to ``ca_file`` (PEM, one
    or more CA certificates), and to nothing else."""

    ca_file: Path

    def __new__(cls, url: str, ca_file: Path) -> Self:
        if not url.startswith("https://"):
            raise ValueError(f"a pinned mirror is an https:// URL, got {url!r}")
        mirror = super().__new__(cls, url)
        mirror.ca_file = ca_file
        return mirror

    def __getnewargs__(self) -> tuple[str, Path]:  # type: ignore[override]  # copy and pickle
        return (str(self), self.ca_file)


def subfolder(mirror: str, name: str) -> str:
    """``mirror``/``name`` (a URL or a folder); a pinned mirror stays pinned to its CA."""
    if isinstance(mirror, PinnedMirror):
        return PinnedMirror(_join(mirror, name), mirror.ca_file)
    return _join(mirror, name) if _is_http(mirror) else str(Path(mirror) / name)


def pinned_context(ca_file: Path) -> ssl.SSLContext:
    """A client context that trusts the CAs in ``ca_file`` only (not the system's store) and
    checks the server's name, TLS 1.2 or newer."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class MirrorPools:
    """One urllib3 pool per trust anchor: ``default`` (the system's store) for plain mirrors,
    one per CA file for pinned ones, made when first needed."""

    def __init__(self, default: urllib3.PoolManager | None = None) -> None:
        self._default = default or urllib3.PoolManager(retries=False)
        self._pinned: dict[Path, urllib3.PoolManager] = {}

    def for_mirror(self, mirror: str) -> urllib3.PoolManager:
        if not isinstance(mirror, PinnedMirror):
            return self._default
        pool = self._pinned.get(mirror.ca_file)
        if pool is None:
            try:
                context = pinned_context(mirror.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise DownloadError(
                    f"cannot load the fleet CA {mirror.ca_file} to verify {mirror}: {exc}"
                ) from exc
            pool = self._pinned[mirror.ca_file] = urllib3.PoolManager(
                retries=False, ssl_context=context
            )
        return pool


def _failure(mirror: str, exc: Exception) -> str:
    """What went wrong with ``mirror``, in words: a refused certificate names the CA."""
    if isinstance(exc, urllib3.exceptions.SSLError) and isinstance(mirror, PinnedMirror):
        return (
            f"{mirror}: TLS: the server's certificate does not verify against the fleet CA "
            f"({mirror.ca_file}): {exc}"
        )
    return f"{mirror}: {exc}"


class MirrorFetcher(FetcherInterface):
    def __init__(
        self,
        mirrors: list[str],
        *,
        timeout_s: float = 30.0,
        pool: urllib3.PoolManager | None = None,
    ) -> None:
        if not mirrors:
            raise ValueError("at least one mirror is needed")
        self.mirrors = mirrors
        self._timeout = urllib3.Timeout(connect=timeout_s, read=timeout_s)
        self._pools = MirrorPools(pool)

    def _fetch(self, url: str) -> Iterator[bytes]:
        relative = url.removeprefix(MIRROR_URL)
        failures: list[str] = []
        not_found = 0
        for mirror in self.mirrors:
            try:
                return self._open(mirror, relative)
            except tuf_exceptions.DownloadHTTPError as exc:
                not_found += exc.status_code == 404
                failures.append(f"{mirror}: HTTP {exc.status_code}")
            except (OSError, urllib3.exceptions.HTTPError, DownloadError) as exc:
                failures.append(_failure(mirror, exc))
        if not_found:  # ngclient reads 404 as "no newer root"; dead mirrors must not mask it
            raise tuf_exceptions.DownloadHTTPError(f"{relative} not found on any mirror", 404)
        raise tuf_exceptions.DownloadError(f"cannot fetch {relative}: " + "; ".join(failures))

    def _open(self, mirror: str, relative: str) -> Iterator[bytes]:
        if not _is_http(mirror):
            path = Path(mirror) / relative
            if not path.is_file():
                raise tuf_exceptions.DownloadHTTPError(f"{path} not found", 404)
            return _as_download_errors(_read_chunks(path, 0))
        response = self._pools.for_mirror(mirror).request(
            "GET", _join(mirror, relative), preload_content=False, timeout=self._timeout
        )
        if response.status != 200:
            _discard(response)
            raise tuf_exceptions.DownloadHTTPError(f"HTTP {response.status}", response.status)
        return _as_download_errors(_stream(response))


def _discard(response: urllib3.BaseHTTPResponse) -> None:
    """Read what is left of an answer we do not want before the connection goes back to the
    pool: released unread (an empty chunked 404, say), its remains would be parsed as the
    next request's answer on that connection."""
    try:
        response.drain_conn()
    finally:
        response.release_conn()


def _as_download_errors(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """python-tuf translates errors raised by _fetch itself, not those raised while it reads
    the iterator: a connection cut mid-body must still arrive as a DownloadError."""
    try:
        yield from chunks
    except (OSError, urllib3.exceptions.HTTPError) as exc:
        raise tuf_exceptions.DownloadError(f"transfer interrupted: {exc}") from exc


def _read_chunks(path: Path, offset: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(CHUNK_BYTES):
            yield chunk


def _stream(response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
    # read1 hands over whatever has arrived, up to a chunk; stream() would fill a whole chunk
    # first and lose it all if the connection broke, so a resume would refetch it.
    try:
        while chunk := response.read1(CHUNK_BYTES):
            yield chunk
    finally:
        response.release_conn()


def download_resumable(
    mirrors: list[str],
    relative: str,
    partial: Path,
    length: int,
    *,
    progress: Callable[[int], None] = lambda n: None,
    pool: urllib3.PoolManager | None = None,
    timeout_s: float = 30.0,
    cancel: threading.Event | None = None,
) -> int:
    """Complete ``partial`` up to ``length`` bytes from the first mirror that serves it.

    Returns the number of bytes fetched in this call. The caller checks the hash: this only
    guarantees the length, and refuses a mirror that sends more than was signed. ``pool``
    serves plain mirrors; a :class:`PinnedMirror` always gets a pool of its own CA.
    """
    pools = MirrorPools(pool)
    timeout = urllib3.Timeout(connect=timeout_s, read=timeout_s)
    failures: list[str] = []
    refused = 0  # mirrors that said no for good
    for mirror in mirrors:
        have = partial.stat().st_size if partial.exists() else 0
        if have > length:  # a leftover from another target of the same name: start over
            partial.unlink()
            have = 0
        if have == length:
            return 0
        progress(have)
        try:
            if _is_http(mirror):
                chunks, have = _http_range(
                    pools.for_mirror(mirror), _join(mirror, relative), have, timeout
                )
            else:
                source = Path(mirror) / relative
                if not source.is_file():
                    raise FileNotFoundError(f"{source} not found")
                chunks = _read_chunks(source, have)
            return _append(partial, chunks, have, length, progress, cancel)
        except (TargetMismatch, InstallCancelled):
            raise
        except OSError as exc:
            if exc.errno == errno.ENOSPC:  # our disk, not the mirror: no other mirror helps
                free = shutil.disk_usage(partial.parent).free
                raise InsufficientSpace(
                    needed_bytes=length - have, available_bytes=free, path=str(partial.parent)
                ) from exc
            failures.append(_failure(mirror, exc))
        except (urllib3.exceptions.HTTPError, DownloadError) as exc:
            refused += isinstance(exc, DownloadRefused)
            failures.append(_failure(mirror, exc))
    error = DownloadRefused if failures and refused == len(failures) else DownloadError
    raise error(f"cannot download {relative}: " + "; ".join(failures))


def _http_range(
    pool: urllib3.PoolManager, url: str, have: int, timeout: urllib3.Timeout
) -> tuple[Iterator[bytes], int]:
    headers = {"Range": f"bytes={have}-"} if have else {}
    response = pool.request("GET", url, headers=headers, preload_content=False, timeout=timeout)
    if response.status == 206:
        return _stream(response), have
    if response.status == 200:
        return _stream(response), 0  # the server ignored Range: the whole file comes again
    _discard(response)
    if 400 <= response.status < 500 and response.status not in (408, 429):
        raise DownloadRefused(f"HTTP {response.status}")
    raise DownloadError(f"HTTP {response.status}")


def _append(
    partial: Path,
    chunks: Iterator[bytes],
    start: int,
    length: int,
    progress: Callable[[int], None],
    cancel: threading.Event | None = None,
) -> int:
    fetched = 0
    mode = "r+b" if start and partial.exists() else "wb"
    with open(partial, mode) as out:
        out.seek(start)
        out.truncate()
        for chunk in chunks:
            if cancel is not None and cancel.is_set():
                # What arrived stays in the partial file: the next attempt resumes from it.
                out.flush()
                os.fsync(out.fileno())
                raise InstallCancelled(f"download cancelled at {start + fetched} of {length} bytes")
            if start + fetched + len(chunk) > length:
                raise TargetMismatch(f"mirror sent more than the signed length of {length} bytes")
            out.write(chunk)
            fetched += len(chunk)
            progress(len(chunk))
        out.flush()
        os.fsync(out.fileno())
    if start + fetched != length:
        raise DownloadError(f"transfer ended at {start + fetched} of {length} bytes")
    return fetched
