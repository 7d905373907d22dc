"""Serve a folder over HTTP with Range requests, optionally slowly: a repository mirror for
tests. ``python -m tests.static_server DIR PORT [--bytes-per-s N] [--stall-after N]
[--request-log FILE]``.

``--stall-after`` stops sending a file's body after N bytes and holds the connection open:
a mirror that hangs mid-download.

``--request-log`` (or the ``STATIC_SERVER_REQUEST_LOG`` environment variable, for servers a
harness starts) appends one JSON line per response: ``{"path", "range", "status"}``, where
``range`` is the request's Range header or null. A test reads it to see whether a download
resumed with a Range request or started again from byte 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path

from aiohttp import web

CHUNK = 16 << 10


def _file(root: Path, relative: str) -> Path:
    path = (root / relative).resolve()
    if root.resolve() not in path.parents or not path.is_file():
        raise web.HTTPNotFound()
    return path


REQUEST_LOG_ENV = "STATIC_SERVER_REQUEST_LOG"


def make_app(
    root: Path,
    bytes_per_s: int | None,
    stall_after: int | None,
    request_log: Path | None = None,
) -> web.Application:
    async def serve(request: web.Request) -> web.StreamResponse:
        path = _file(root, request.match_info["path"])
        if bytes_per_s is None and stall_after is None:
            return web.FileResponse(path)
        data = _read(path)
        start = request.http_range.start or 0
        body = data[start:]
        status = 206 if start else 200
        response = web.StreamResponse(status=status)
        response.content_length = len(body)
        if start:
            response.headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        await response.prepare(request)
        sent = 0
        for offset in range(0, len(body), CHUNK):
            if stall_after is not None and start + sent >= stall_after:
                await asyncio.sleep(3600)
            piece = body[offset : offset + CHUNK]
            await response.write(piece)
            sent += len(piece)
            if bytes_per_s:
                await asyncio.sleep(len(piece) / bytes_per_s)
        await response.write_eof()
        return response

    async def log_request(request: web.Request, response: web.StreamResponse) -> None:
        # Before the body goes: a stalled response is logged too. One write per line, so
        # the reader never sees half a line.
        assert request_log is not None
        line = {"path": request.path, "range": request.headers.get("Range")}
        _append_line(request_log, json.dumps({**line, "status": response.status}))

    app = web.Application()
    app.router.add_get("/{path:.+}", serve)
    if request_log is not None:
        app.on_response_prepare.append(log_request)
    return app


def _append_line(path: Path, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")


def _read(path: Path) -> bytes:
    return path.read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("port", type=int)
    parser.add_argument("--bytes-per-s", type=int)
    parser.add_argument("--stall-after", type=int)
    parser.add_argument("--request-log", type=Path, default=os.environ.get(REQUEST_LOG_ENV))
    args = parser.parse_args()
    web.run_app(
        make_app(args.root, args.bytes_per_s, args.stall_after, args.request_log),
        host="127.0.0.1",
        port=args.port,
        print=None,
        shutdown_timeout=0.5,  # a stalled response must not hold the server up
    )


if __name__ == "__main__":
    main()
