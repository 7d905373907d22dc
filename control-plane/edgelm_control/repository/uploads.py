"""Receiving a model push: a multipart body streamed to temporary files, hashed on the way.

Part ``targets`` is the signed targets metadata (kept in memory, at most
:data:`MAX_TARGETS_BYTES`); every other part is a blob, written to a file under the
repository's ``.incoming/`` folder (the same file system as ``targets/``, so placing it is a
hard link, not a copy) while its sha256 and length are computed. A part may be named by its
sha256, as ``edgelm fleet models push`` names them, or anything else (``blob``): blobs are
identified by what they hash to, never by what they claim.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import BadHttpMessage

from edgelm_control.errors import PayloadTooLarge
from edgelm_control.repository.errors import MalformedTargets
from edgelm_control.repository.push import ReceivedBlob

MAX_TARGETS_BYTES = 4 << 20
CHUNK_BYTES = 1 << 20


@dataclass
class Upload:
    """What came: the targets bytes and the blobs, by their actual sha256."""

    directory: Path
    targets: bytes = b""
    blobs: dict[str, ReceivedBlob] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)

    def discard(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


async def receive_push(
    request: web.Request,
    incoming_dir: Path,
    *,
    max_bytes: int,
    check_targets: Callable[[bytes], Awaitable[None]] | None = None,
) -> Upload:
    """Read the whole multipart body; the caller must ``discard()`` the upload afterwards.

    ``check_targets`` sees the targets metadata as soon as its part has arrived; when that
    part comes first (as ``edgelm fleet models push`` sends it), a forged or stale push is
    refused before a single blob byte is read or written.
    """
    if not request.content_type.startswith("multipart/"):
        raise MalformedTargets(
            f"a model push must be multipart/form-data, got {request.content_type or 'no type'}",
            param="content-type",
        )
    upload = Upload(incoming_dir / uuid.uuid4().hex)
    await asyncio.to_thread(upload.directory.mkdir, parents=True)
    try:
        try:
            reader = await request.multipart()
        except ValueError as exc:  # aiohttp cannot split a body whose type has no boundary
            raise MalformedTargets(
                f"a model push must be multipart/form-data with a boundary: {exc}",
                param="content-type",
            ) from exc
        total = 0
        targets_seen = False
        while True:
            part = await _next_part(reader)
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise MalformedTargets("nested multipart bodies are not accepted", param="body")
            name = part.name
            if not name:
                raise MalformedTargets("every part needs a name", param="body")
            if name == "targets":
                if targets_seen:
                    raise MalformedTargets("part targets came twice", param="targets")
                targets_seen = True
                upload.targets = await _read_small(part)
                total += len(upload.targets)
                if check_targets is not None:
                    await check_targets(upload.targets)
            else:
                total += await _receive_blob(part, name, upload, max_bytes - total)
            if total > max_bytes:
                raise PayloadTooLarge(
                    f"a model push must be at most {max_bytes} bytes", limit_bytes=max_bytes
                )
        if not targets_seen:
            raise MalformedTargets("the push has no part named targets", param="targets")
        return upload
    except BaseException:
        await asyncio.to_thread(upload.discard)
        raise


#: What aiohttp raises for a multipart body that breaks its own rules: a boundary not where it
#: should be, a part header that is not a header, a bad part Content-Length.
_MALFORMED = (ValueError, BadHttpMessage)


async def _next_part(reader: MultipartReader) -> MultipartReader | BodyPartReader | None:
    """The next part, or None at the end; a malformed body is the client's 400, not a 500."""
    try:
        return await reader.next()
    except _MALFORMED as exc:
        raise MalformedTargets(f"the multipart body is malformed: {exc}", param="body") from exc


async def _chunk(part: BodyPartReader) -> bytes:
    try:
        return await part.read_chunk(CHUNK_BYTES)
    except _MALFORMED as exc:
        raise MalformedTargets(f"part {part.name} is malformed: {exc}", param="body") from exc


async def _read_small(part: BodyPartReader) -> bytes:
    data = bytearray()
    while chunk := await _chunk(part):
        data += chunk
        if len(data) > MAX_TARGETS_BYTES:
            raise PayloadTooLarge(
                f"targets metadata must be at most {MAX_TARGETS_BYTES} bytes",
                limit_bytes=MAX_TARGETS_BYTES,
                param="targets",
            )
    return bytes(data)


async def _receive_blob(part: BodyPartReader, name: str, upload: Upload, room: int) -> int:
    path = upload.directory / f"part-{len(upload.files) + len(upload.blobs)}-{uuid.uuid4().hex}"
    hasher = hashlib.sha256()
    length = 0
    with await asyncio.to_thread(open, path, "wb") as sink:
        while chunk := await _chunk(part):
            length += len(chunk)
            if length > room:
                raise PayloadTooLarge(
                    "a model push is larger than allowed", limit_bytes=room, param=name
                )
            await asyncio.to_thread(_absorb, sink, hasher, chunk)
        await asyncio.to_thread(_sync, sink)
    sha256 = hasher.hexdigest()
    if sha256 in upload.blobs:  # the same content twice: keep one
        await asyncio.to_thread(path.unlink)
        return length
    upload.blobs[sha256] = ReceivedBlob(part=name, sha256=sha256, length=length)
    upload.files[sha256] = path
    return length


def _absorb(sink: BinaryIO, hasher: hashlib._Hash, chunk: bytes) -> None:
    hasher.update(chunk)
    sink.write(chunk)


def _sync(sink: BinaryIO) -> None:
    sink.flush()
    os.fsync(sink.fileno())
