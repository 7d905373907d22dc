"""Serve a listening socket with aiohttp's connection handler, guarded against exhaustion.

Anything on the box can open connections to the loopback HTTP listener, and a local client that
opens many and sends nothing, or half a request line, must not lock the agent out. So:

* **Header and idle timeout.** aiohttp's keep-alive timer starts when a connection opens and is
  not reset by partial data; a connection whose next request's headers have not arrived in
  ``idle_timeout_s`` is closed. That bounds half-open connections, trickled headers and idle
  keep-alive connections alike. (A body that trickles is bounded separately, where it is read.)
* **A cap on TCP connections**, set below the process's open-file limit with descriptors kept in
  reserve, so the Unix socket, the database and model files always get a descriptor. A
  connection over the cap is answered 503 with ``Retry-After`` and closed.
* **JSON errors for malformed HTTP.** aiohttp answers what its parser refuses (an oversized
  header, too many headers, a duplicate Host, a bad request line or Content-Length) in
  ``text/plain`` and logs a traceback; here it is the same JSON error body as every other error,
  and one log line, at a limited rate.

aiohttp has no public hook for these, so :class:`GuardedRequestHandler` subclasses its
``RequestHandler`` (aiohttp is pinned below 4, where that class is stable) and
:class:`Listener` feeds it to ``loop.create_server`` in place of a ``web.SockSite``.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from edgelm_agent.api.errors import error_body
from edgelm_agent.logs import RateLimitedLog

log = structlog.get_logger(__name__)

#: aiohttp's own limits on the request line and on header lines, kept; named for the docs.
MAX_LINE_BYTES = 8190
MAX_HEADERS = 128

#: Connections a capped listener accepts per wake-up (and the kernel's queue of pending ones).
ACCEPT_BATCH = 32
#: The Unix socket's: its clients are trusted by their group, and a burst of them must queue
#: in the kernel rather than be refused.
UNIX_BACKLOG = 128

_protocol_errors = RateLimitedLog(log, "http_protocol_error", every_s=10.0)
_refusals = RateLimitedLog(log, "http_connection_refused", every_s=10.0)


def classify_protocol_error(
    status: int, exc: BaseException | None, message: str | None
) -> tuple[int, str, str]:
    """(status, code, message) for what aiohttp's parser refused."""
    text = message or (str(exc) if exc is not None else "") or "malformed HTTP request"
    text = text.strip().splitlines()[0] if text.strip() else "malformed HTTP request"
    if isinstance(exc, http_exceptions.LineTooLong):
        return 431, "header_too_large", f"a request or header line is too long: {text}"
    if isinstance(exc, http_exceptions.BadHttpMessage) and "Too many headers" in text:
        return 431, "too_many_headers", f"a request may carry at most {MAX_HEADERS} headers"
    if isinstance(exc, http_exceptions.BadStatusLine):
        return 400, "bad_request_line", f"the request line is not valid HTTP: {text}"
    if isinstance(exc, http_exceptions.InvalidHeader | http_exceptions.ContentLengthError) or (
        "Content-Length" in text
    ):
        return 400, "bad_header", f"a header is not valid: {text}"
    if status >= 500:
        return 500, "internal_error", "internal error; see the agent log"
    return 400, "bad_http_request", f"the request is not valid HTTP: {text}"


class GuardedRequestHandler(RequestHandler):
    """aiohttp's handler for one connection, answering protocol errors in JSON and telling its
    listener when the connection has closed."""

    def __init__(
        self,
        manager: web.Server,
        *,
        loop: asyncio.AbstractEventLoop,
        on_closed: Callable[[], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._on_closed: Callable[[], None] | None = on_closed

    def connection_lost(self, exc: BaseException | None) -> None:
        try:
            super().connection_lost(exc)
        finally:
            on_closed, self._on_closed = self._on_closed, None
            if on_closed is not None:
                on_closed()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        status, code, text = classify_protocol_error(status, exc, message)
        _protocol_errors.emit(status=status, code=code, error=text[:200])
        if request.writer.output_size > 0:  # as aiohttp: a response is on the wire already
            raise ConnectionError("a response was already sent; cannot send the error")
        error_type = "server_error" if status >= 500 else "invalid_request_error"
        response = web.json_response(error_body(text, error_type, code), status=status)
        response.force_close()
        return response


def _refusal_bytes(retry_after_s: int) -> bytes:
    body = json.dumps(
        error_body(
            "too many open connections to this agent; retry later",
            "server_error",
            "too_many_connections",
        )
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Retry-After: {retry_after_s}\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class _Refusal(asyncio.Protocol):
    """Answers 503 and closes: what a connection over the cap gets instead of a handler.

    Closing at once, with the client's request still unread, makes the kernel send a reset,
    which can destroy the 503 before the client reads it. So the write side is shut after
    the answer and the connection lingers briefly, discarding what arrives, until the client
    closes. Lingering connections are themselves bounded: past ``MAX_LINGERING`` a refusal
    closes at once, so a flood cannot turn refusals into held descriptors.
    """

    LINGER_S = 0.5
    MAX_LINGERING = 32
    lingering = 0

    def __init__(self, response: bytes) -> None:
        self._response = response
        self._transport: asyncio.WriteTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        self._transport = transport
        transport.write(self._response)
        if _Refusal.lingering >= self.MAX_LINGERING or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        _Refusal.lingering += 1
        self._counted = True
        self._timer = asyncio.get_running_loop().call_later(self.LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        pass  # the request we will not serve

    def eof_received(self) -> bool:
        if self._transport is not None:
            self._transport.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._counted:
            _Refusal.lingering -= 1
            self._counted = False


class Listener:
    """One listening socket, served by ``server`` (the runner's aiohttp server)."""

    def __init__(
        self,
        sock: socket.socket,
        server: web.Server,
        *,
        name: str,
        idle_timeout_s: float,
        max_connections: int | None,
        retry_after_s: int = 1,
        backlog: int = ACCEPT_BATCH,
    ) -> None:
        self.sock = sock
        self.backlog = backlog
        self.name = name
        self.max_connections = max_connections
        self.open_connections = 0
        self._manager = server
        self._handler_args: dict[str, Any] = {
            "keepalive_timeout": idle_timeout_s,
            "max_line_size": MAX_LINE_BYTES,
            "max_field_size": MAX_LINE_BYTES,
            "max_headers": MAX_HEADERS,
            "access_log": None,  # the middleware logs every request
        }
        self._refusal = _refusal_bytes(retry_after_s)
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # asyncio accepts up to `backlog` connections per wake-up before any of them can be
        # closed, so on a capped listener the batch must fit in the descriptors kept in
        # reserve (see listeners.py).
        self._server = await loop.create_server(
            self._protocol, sock=self.sock, backlog=self.backlog
        )

    def _protocol(self) -> asyncio.BaseProtocol:
        if self.max_connections is not None and self.open_connections >= self.max_connections:
            _refusals.emit(listener=self.name, open=self.open_connections)
            return _Refusal(self._refusal)
        self.open_connections += 1
        return GuardedRequestHandler(
            self._manager,
            loop=asyncio.get_running_loop(),
            on_closed=self._closed,
            **self._handler_args,
        )

    def _closed(self) -> None:
        self.open_connections -= 1

    def stop_accepting(self) -> None:
        """Close the listening socket; open connections stay until the runner closes them."""
        if self._server is not None:
            self._server.close()
