"""A server-sent-events response that owns the wire once its headers are out.

After ``prepare()`` the status line is sent, so an error can no longer become an HTTP error
response. It becomes an ``error`` event instead, which the openai client raises as ``APIError``,
and the stream is then closed properly, so clients never hang or see garbage.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from edgelm_agent.api.access import HttpAccessPolicy
from edgelm_agent.api.context import ALLOWED_ORIGIN, PREPARED_RESPONSE, REQUEST_ID
from edgelm_agent.api.errors import error_body

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # a reverse proxy in front must not buffer the stream
}


class _SseResponse(web.StreamResponse):
    # Hold the headers back until the first event, so both leave in one write: one wake-up of
    # the client instead of two, which on a 2-core device is measurable in time to first token.
    # (aiohttp's own web.Response sets this attribute the same way.)
    _send_headers_immediately = False


def sse_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


class SseStream:
    def __init__(self, request: web.Request) -> None:
        self._request = request
        self._response: web.StreamResponse | None = None

    @property
    def opened(self) -> bool:
        return self._response is not None

    async def open(self, headers: dict[str, str] | None = None) -> None:
        response = _SseResponse(headers={**SSE_HEADERS, **(headers or {})})
        response.headers["X-Request-Id"] = self._request[REQUEST_ID]
        origin = self._request.get(ALLOWED_ORIGIN)
        if origin is not None:  # the headers go out now: the middleware cannot add them later
            response.headers.update(HttpAccessPolicy.cors_headers(origin))
        self._request[PREPARED_RESPONSE] = response
        await response.prepare(self._request)
        self._response = response

    async def send_encoded(self, events: bytes) -> None:
        """Write one or more already encoded events in a single write."""
        assert self._response is not None, "open() first"
        await self._response.write(events)

    async def finish(self) -> web.StreamResponse:
        assert self._response is not None, "open() first"
        await self._response.write(b"data: [DONE]\n\n")
        await self._response.write_eof()
        return self._response

    async def fail(self, message: str, error_type: str, code: str | None) -> web.StreamResponse:
        """End an open stream with an error event instead of the rest of the answer."""
        assert self._response is not None, "open() first"
        await self._response.write(sse_event(error_body(message, error_type, code)))
        await self._response.write_eof()
        return self._response
