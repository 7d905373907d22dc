"""Serve a listening socket with aiohttp's connection handler, guarded against exhaustion.

Anything on the box can open connections to the loopback HTTP listener, and a careless app in
group ``edgelm`` can open many to the Unix socket; a client that opens many and sends nothing,
half a request line, or stops reading what it asked for, must not lock the agent out. So:

* **Header and idle timeout.** aiohttp's keep-alive timer starts when a connection opens and is
  not reset by partial data; a connection whose next request's headers have not arrived in
  ``idle_timeout_s`` is closed. That bounds half-open connections, trickled headers and idle
  keep-alive connections alike. (A body that trickles is bounded separately, where it is read.)
* **Write timeout.** A client that stops reading fills the socket's buffers, and the transport
  pauses writing; if it stays paused for ``idle_timeout_s`` (no write has made progress), the
  connection is aborted. That covers streams, large bodies and pipelined requests alike, which
  would otherwise hold a connection, a slot and the buffered answer for as long as the client
  wished.
* **A cap on connections, on each listener**, set so that both together stay below the
  process's open-file limit with descriptors kept in reserve (see listeners.py), so the
  database and model files always get one, and a flood on one listener leaves the other its
  share. A connection over the cap is answered 503 with ``Retry-After`` and closed.
* **Accepting pauses when descriptors run out** (``EMFILE``), for a second, instead of retrying
  at once in a loop that spins the CPU and floods the log.
* **JSON errors for malformed HTTP.** aiohttp answers what its parser refuses (an oversized
  header, too many headers, a duplicate Host, a bad request line or Content-Length) in
  ``text/plain`` and logs a traceback; here it is the same JSON error body as every other error,
  and one log line, at a limited rate. An ``Expect`` header other than ``100-continue``, which
  aiohttp refuses before any middleware runs, is set aside for the middleware to refuse after
  its access checks (see :func:`defer_unknown_expectations`).

aiohttp has no public hook for these, so :class:`GuardedRequestHandler` subclasses its
``RequestHandler`` (aiohttp is pinned below 4, where that class is stable) and
:class:`Listener` accepts connections itself and hands them to ``connect_accepted_socket``.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import hdrs, http_exceptions, web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from multidict import CIMultiDict, CIMultiDictProxy

from edgelm_agent.api.context import UNKNOWN_EXPECTATION
from edgelm_agent.api.errors import error_body
from edgelm_agent.logs import RateLimitedLog

log = structlog.get_logger(__name__)

#: aiohttp's own limits on the request line and on header lines, kept; named for the docs.
MAX_LINE_BYTES = 8190
MAX_HEADERS = 128

#: Connections a listener accepts per wake-up.
ACCEPT_BATCH = 32
#: Out of descriptors (or memory), how long a listener waits before it accepts again.
ACCEPT_RETRY_S = 1.0

_protocol_errors = RateLimitedLog(log, "http_protocol_error", every_s=10.0)
_refusals = RateLimitedLog(log, "http_connection_refused", every_s=10.0)
_accept_failures = RateLimitedLog(log, "accept_failed", every_s=10.0)
_stalled_writes = RateLimitedLog(log, "http_write_stalled", every_s=10.0)


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
    """aiohttp's handler for one connection, answering protocol errors in JSON, aborting a
    connection whose writes stall, and telling its listener when the connection has closed."""

    def __init__(
        self,
        manager: web.Server,
        *,
        loop: asyncio.AbstractEventLoop,
        on_closed: Callable[[], None],
        write_timeout_s: float,
        listener: str,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._on_closed: Callable[[], None] | None = on_closed
        self._write_timeout_s = write_timeout_s
        self._listener_name = listener
        self._stall_timer: asyncio.TimerHandle | None = None

    def pause_writing(self) -> None:
        """The client is not reading fast enough: the buffers are full. It gets the write
        timeout to make room, or the connection goes."""
        super().pause_writing()
        if self._stall_timer is None:
            self._stall_timer = self._loop.call_later(self._write_timeout_s, self._stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _stalled(self) -> None:
        self._stall_timer = None
        _stalled_writes.emit(listener=self._listener_name, timeout_s=self._write_timeout_s)
        if self.transport is not None:
            self.transport.abort()  # close() would wait for the unread buffer to drain

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
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
    """One listening socket, served by ``server`` (the runner's aiohttp server), with at most
    ``max_connections`` open at once."""

    def __init__(
        self,
        sock: socket.socket,
        server: web.Server,
        *,
        name: str,
        idle_timeout_s: float,
        max_connections: int,
        retry_after_s: int = 1,
    ) -> None:
        self.sock = sock
        self.name = name
        self.max_connections = max_connections
        self.open_connections = 0
        self._manager = server
        self._idle_timeout_s = idle_timeout_s
        self._handler_args: dict[str, Any] = {
            "keepalive_timeout": idle_timeout_s,
            "max_line_size": MAX_LINE_BYTES,
            "max_field_size": MAX_LINE_BYTES,
            "max_headers": MAX_HEADERS,
            "access_log": None,  # the middleware logs every request
        }
        self._refusal = _refusal_bytes(retry_after_s)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._connecting: set[asyncio.Task[None]] = set()  # held: the loop keeps weak refs
        self._closed = False
        #: Whether the listener is waiting for connections now (not paused, not stopped).
        self.accepting = False

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        self._resume_accepting()

    def _resume_accepting(self) -> None:
        self._retry = None
        if self._closed or self._loop is None:
            return
        self._loop.add_reader(self.sock.fileno(), self._accept_ready)
        self.accepting = True

    def _pause_accepting(self) -> None:
        assert self._loop is not None
        self._loop.remove_reader(self.sock.fileno())
        self.accepting = False
        self._retry = self._loop.call_later(ACCEPT_RETRY_S, self._resume_accepting)

    def _accept_ready(self) -> None:
        """Accept what is waiting, up to a batch. Each connection is counted as it is
        accepted, so the cap holds even within one batch."""
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                # Out of descriptors (EMFILE), the kernel reports the socket readable again at
                # once: stop watching it for a moment rather than spin on accept().
                _accept_failures.emit(listener=self.name, error=exc.strerror or repr(exc))
                self._pause_accepting()
                return
            conn.setblocking(False)
            protocol = self._protocol()
            assert self._loop is not None
            task = self._loop.create_task(self._connect(conn, protocol))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)

    async def _connect(self, conn: socket.socket, protocol: asyncio.BaseProtocol) -> None:
        assert self._loop is not None
        try:
            await self._loop.connect_accepted_socket(lambda: protocol, sock=conn)
        except Exception:  # the client left before it was served: nothing to serve
            conn.close()
            if isinstance(protocol, GuardedRequestHandler) and protocol.transport is None:
                self._closed_one()  # counted at accept, never connected, so never closed

    def _protocol(self) -> asyncio.BaseProtocol:
        if self.open_connections >= self.max_connections:
            _refusals.emit(listener=self.name, open=self.open_connections)
            return _Refusal(self._refusal)
        self.open_connections += 1
        assert self._loop is not None
        return GuardedRequestHandler(
            self._manager,
            loop=self._loop,
            on_closed=self._closed_one,
            write_timeout_s=self._idle_timeout_s,
            listener=self.name,
            **self._handler_args,
        )

    def _closed_one(self) -> None:
        self.open_connections -= 1

    def stop_accepting(self) -> None:
        """Close the listening socket; open connections stay until the runner closes them."""
        if self._closed:
            return
        self._closed = True
        self.accepting = False
        if self._retry is not None:
            self._retry.cancel()
        if self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()


def defer_unknown_expectations(server: web.Server) -> None:
    """Let the middleware refuse an ``Expect`` other than ``100-continue``.

    aiohttp answers an unknown expectation itself, before any middleware: in ``text/plain``,
    without the Host check and without a log line. So the header is taken out of such a request
    as it is made, and set aside on it for the middleware, which refuses it in JSON after its
    access checks like any other error.
    """
    make_request = server.request_factory

    def request_factory(message: Any, *args: Any, **kwargs: Any) -> web.BaseRequest:
        expect = message.headers.get(hdrs.EXPECT)
        if expect is None or expect.lower() == "100-continue":
            return make_request(message, *args, **kwargs)
        headers = CIMultiDict(message.headers)
        del headers[hdrs.EXPECT]
        raw = tuple((k, v) for k, v in message.raw_headers if k.lower() != b"expect")
        message = message._replace(headers=CIMultiDictProxy(headers), raw_headers=raw)
        request = make_request(message, *args, **kwargs)
        request[UNKNOWN_EXPECTATION] = expect
        return request

    server.request_factory = request_factory
