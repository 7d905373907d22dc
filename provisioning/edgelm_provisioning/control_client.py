"""The control plane's REST API (``/api/v1``) over aiohttp, for every ``edgelm fleet`` command.

Errors leave this module as the package's own (:mod:`edgelm_provisioning.errors`), never as
aiohttp's:

* no connection, a connection cut, or no answer in time → :class:`ControlUnreachable`;
* an error answer, whose body has the agent's shape
  ``{"error": {"message", "type", "param", "code"}}`` → :class:`ControlRequestFailed`, with the
  server's ``code`` as its reference (a body of another shape, say a proxy's HTML page, gives
  ``http-<status>``);
* a success answer that is not JSON → :class:`ControlProtocolError`.

Model uploads stream each file from disk in chunks (never whole into memory) with a known
``Content-Length`` and report every chunk sent, so a large model shows its progress.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import BytesPayload, Payload

from edgelm_provisioning.errors import (
    ControlProtocolError,
    ControlRequestFailed,
    ControlUnreachable,
)
from edgelm_provisioning.model_source import Blob
from edgelm_provisioning.sse import ServerSentEvent, SSEDecoder

API = "/api/v1"
CHUNK_BYTES = 1 << 20
Query = Sequence[tuple[str, str]]
_NOT_JSON = object()


class _FilePart(Payload):
    """One file of a multipart upload, read in a worker thread chunk by chunk.

    At most ``size`` bytes are sent even if the file grew since it was hashed: the part's
    length is declared up front, and sending more would break the multipart framing (the
    control plane then refuses the blob by its length or hash, which is the right outcome).
    """

    def __init__(self, path: Path, size: int, on_bytes: Callable[[int], None]) -> None:
        super().__init__(path, content_type="application/octet-stream")
        self._path = path
        self._size = size
        self._length = size
        self._on_bytes = on_bytes

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("a model file is binary; it has no text form")

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        remaining = self._length if content_length is None else min(self._length, content_length)
        f = await asyncio.to_thread(self._path.open, "rb")
        try:
            while remaining > 0:
                chunk = await asyncio.to_thread(f.read, min(CHUNK_BYTES, remaining))
                if not chunk:
                    break
                await writer.write(chunk)
                remaining -= len(chunk)
                self._on_bytes(len(chunk))
        finally:
            await asyncio.to_thread(f.close)


def _error_fields(body: Any) -> dict[str, Any]:
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


class ControlClient:
    """One session to one control plane, with its bearer token on every API call."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 10.0,
        stream_idle_timeout_s: float = 90.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """``ssl_context``: whom to trust for an ``https://`` control plane; None is the
        system's store (see :mod:`edgelm_provisioning.operator_tls`)."""
        self.base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=connect_timeout_s)
        self._upload_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout_s, sock_read=600
        )
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout_s, sock_read=stream_idle_timeout_s
        )
        self._session = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {token}", "User-Agent": "edgelm-fleet"},
            timeout=self._timeout,
            connector=aiohttp.TCPConnector(ssl=ssl_context if ssl_context is not None else True),
        )

    async def __aenter__(self) -> ControlClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._session.close()

    def url(self, path: str) -> str:
        return f"{self.base_url}{API}{path}"

    # --- plain JSON calls ----------------------------------------------------------------------

    async def get(self, path: str, query: Query | None = None) -> Any:
        return await self._call("GET", path, query=query)

    async def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return await self._call("POST", path, body=body if body is not None else {})

    async def revoke_device(self, device_id: str, *, reason: str | None = None) -> Any:
        """``POST /api/v1/devices/{id}/revoke``: the device's revocation, and what it did."""
        return await self.post(
            f"/devices/{device_id}/revoke", {} if reason is None else {"reason": reason}
        )

    async def _call(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        query: Query | None = None,
    ) -> Any:
        url = self.url(path)
        try:
            async with self._session.request(
                method, url, json=body, params=list(query or ())
            ) as response:
                return await _json_answer(response, method, url)
        except aiohttp.ClientConnectionError as exc:
            raise _unreachable(url, exc) from exc
        except TimeoutError as exc:
            raise ControlUnreachable(
                f"no answer from the control plane within {self._timeout.total} s", url=url
            ) from exc

    # --- model upload --------------------------------------------------------------------------

    async def upload_model(
        self,
        targets_json: bytes,
        blobs: Sequence[Blob],
        on_bytes: Callable[[int], None] = lambda n: None,
    ) -> Any:
        """``POST /api/v1/models``: part ``targets`` first (so the server can refuse bad
        metadata before reading gigabytes), then one part per blob, named by its sha256."""
        url = self.url("/models")
        with aiohttp.MultipartWriter("form-data") as form:
            metadata = BytesPayload(targets_json, content_type="application/json")
            metadata.set_content_disposition("form-data", name="targets", filename="targets.json")
            form.append_payload(metadata)
            for blob in blobs:
                part: Payload
                if blob.data is not None:
                    part = BytesPayload(blob.data, content_type="application/octet-stream")
                else:
                    assert blob.path is not None
                    part = _FilePart(blob.path, blob.length, on_bytes)
                part.set_content_disposition("form-data", name=blob.sha256, filename=blob.name)
                form.append_payload(part)
            try:
                async with self._session.post(
                    url, data=form, timeout=self._upload_timeout
                ) as response:
                    return await _json_answer(response, "POST", url)
            except aiohttp.ClientConnectionError as exc:
                raise _unreachable(url, exc) from exc
            except TimeoutError as exc:
                raise ControlUnreachable("the upload stalled", url=url) from exc

    # --- the event stream ----------------------------------------------------------------------

    async def events(
        self, on_open: Callable[[], None] = lambda: None
    ) -> AsyncIterator[ServerSentEvent]:
        """``GET /api/v1/events``, one event at a time, until the server ends the stream.

        ``on_open`` is called once the stream is established (anything that happened before
        is not in it, so a caller refreshes its view then). A drop, or silence past the idle
        timeout, raises :class:`ControlUnreachable`; callers that can do without the stream
        (``rollouts watch``) fall back to polling.
        """
        url = self.url("/events")
        try:
            async with self._session.get(
                url, headers={"Accept": "text/event-stream"}, timeout=self._stream_timeout
            ) as response:
                if response.status != 200:
                    await _json_answer(response, "GET", url)
                    raise ControlProtocolError(
                        f"the event stream answered HTTP {response.status}", url=url
                    )
                decoder = SSEDecoder(url=url)
                on_open()
                async for chunk in response.content.iter_any():
                    for event in decoder.feed(chunk):
                        yield event
        except aiohttp.ClientConnectionError as exc:
            raise _unreachable(url, exc) from exc
        except TimeoutError as exc:
            raise ControlUnreachable("the event stream went silent", url=url) from exc


def _unreachable(url: str, exc: Exception) -> ControlUnreachable:
    return ControlUnreachable(f"cannot reach the control plane: {exc}", url=url)


async def _json_answer(response: aiohttp.ClientResponse, method: str, url: str) -> Any:
    raw = await response.read()
    body: Any
    try:
        body = json.loads(raw) if raw else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        body = _NOT_JSON
    if response.status >= 400:
        error = _error_fields(body)
        raise ControlRequestFailed(
            url=url,
            method=method,
            status_code=response.status,
            code=_text(error.get("code")),
            message=_text(error.get("message"))
            or f"the control plane answered HTTP {response.status} {response.reason or ''}".strip(),
            param=_text(error.get("param")),
            error_type=_text(error.get("type")),
        )
    if body is _NOT_JSON:
        raise ControlProtocolError(
            f"the control plane answered {method} with something that is not JSON "
            f"({response.content_type}, {len(raw)} bytes)",
            url=url,
            hint="is --control the control plane's URL (not the broker's, not a proxy page)?",
        )
    return body
