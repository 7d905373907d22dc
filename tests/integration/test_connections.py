"""Connections cannot exhaust the agent: half-open and idle ones are closed, TCP is capped with
descriptors in reserve so the Unix socket always answers, and malformed HTTP gets JSON."""

from __future__ import annotations

import asyncio
import errno
import json
import resource
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from edgelm_agent.api.connections import Listener
from edgelm_agent.listeners import FD_RESERVE, bind_unix_socket, connection_caps
from tests.agent_process import AgentProcess

StartAgent = Callable[..., AgentProcess]


async def read_until_closed(reader: asyncio.StreamReader, timeout_s: float = 60) -> bytes:
    """Everything the agent sends until it closes the connection (the deadline is only a
    safety net: the tests wait for the close itself)."""
    data = b""
    async with asyncio.timeout(timeout_s):
        while chunk := await reader.read(65536):
            data += chunk
    return data


def parse_response(raw: bytes) -> tuple[int, dict[str, str], dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, json.loads(body)


async def raw_exchange(port: int, payload: bytes) -> tuple[int, dict[str, str], dict[str, object]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        return parse_response(await read_until_closed(reader))
    finally:
        writer.close()


async def unix_exchange(
    path: Path, payload: bytes
) -> tuple[int, dict[str, str], dict[str, object]]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(payload)
        await writer.drain()
        return parse_response(await read_until_closed(reader))
    finally:
        writer.close()


Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


@pytest.fixture
async def serve(short_tmp: Path) -> AsyncIterator[Callable[[Handler], Awaitable[Listener]]]:
    """Serve a handler on a real Unix socket through the agent's Listener, idle timeout 1 s."""
    servers: list[tuple[Listener, web.Server]] = []

    async def start(handler: Handler) -> Listener:
        server = web.Server(handler, handler_cancellation=True)
        sock = bind_unix_socket(short_tmp / f"s{len(servers)}.sock")
        listener = Listener(sock, server, name="unix", idle_timeout_s=1.0, max_connections=10)
        await listener.start()
        servers.append((listener, server))
        return listener

    yield start
    for listener, server in servers:
        listener.stop_accepting()
        await server.shutdown(1.0)


REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def silent_client(path: str, request: bytes) -> socket.socket:
    """A client that sends a request and then never reads, with a small receive buffer."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(path)
    client.sendall(request)
    return client


async def until(condition: Callable[[], bool], timeout_s: float = 60) -> None:
    """Wait for ``condition``; the deadline is only a safety net."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.02)


class TestStalledWrites:
    async def test_a_stream_nobody_reads_is_closed_after_the_idle_timeout(self, serve):
        """A client that stops reading an endless stream is disconnected once a write has
        made no progress for the idle timeout: its handler ends, its slot is free."""
        ended: list[str] = []

        async def endless(request: web.BaseRequest) -> web.StreamResponse:
            response = web.StreamResponse()
            await response.prepare(request)
            try:
                while True:
                    await response.write(b"x" * 65536)
            except BaseException as exc:
                ended.append(type(exc).__name__)
                raise

        listener = await serve(endless)
        client = silent_client(str(listener.sock.getsockname()), REQUEST)
        try:
            await until(lambda: bool(ended))
            await until(lambda: listener.open_connections == 0)
        finally:
            client.close()

    async def test_a_large_body_nobody_reads_is_closed_after_the_idle_timeout(self, serve):
        """The same holds for a large response that is not streamed (a long page of jobs):
        the connection is closed, not held until the client wishes."""

        async def big(request: web.BaseRequest) -> web.StreamResponse:
            return web.Response(body=b"x" * (64 << 20))

        listener = await serve(big)
        client = silent_client(str(listener.sock.getsockname()), REQUEST)
        try:
            await until(lambda: listener.open_connections == 1)
            await until(lambda: listener.open_connections == 0)
        finally:
            client.close()


class ExhaustedSocket(socket.socket):
    """A listening socket whose accept() fails as a process out of descriptors does."""

    accepts = 0

    def accept(self) -> tuple[socket.socket, object]:
        self.accepts += 1
        raise OSError(errno.EMFILE, "Too many open files")


class TestOutOfDescriptors:
    async def test_accept_pauses_instead_of_spinning(self, short_tmp: Path):
        """Out of descriptors, a listener tries accept() once, logs it, and pauses before
        trying again, instead of retrying in a loop that floods the log and the CPU."""
        path = short_tmp / "x.sock"
        sock = ExhaustedSocket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        sock.listen(128)
        sock.setblocking(False)

        async def ok(request: web.BaseRequest) -> web.StreamResponse:
            return web.Response()

        listener = Listener(
            sock, web.Server(ok), name="unix", idle_timeout_s=1.0, max_connections=10
        )
        with capture_logs() as logs:
            await listener.start()
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.connect(str(path))
            try:
                await until(lambda: sock.accepts > 0)
                assert sock.accepts == 1
                assert not listener.accepting
            finally:
                client.close()
                listener.stop_accepting()
        assert [e["listener"] for e in logs if e["event"] == "accept_failed"] == ["unix"]


class TestConnectionCaps:
    @pytest.mark.parametrize("soft", [256, 1024, 4096, 1 << 20])
    @pytest.mark.parametrize("configured", [16, 256, 10_000])
    def test_both_listeners_together_keep_the_reserve(self, soft, configured):
        """The Unix and TCP caps together stay below the open-file limit minus the reserve,
        TCP never gets more than configured, and the Unix socket keeps a share of its own."""
        unix, tcp = connection_caps(configured, soft, http=True)
        assert unix + tcp <= max(soft - FD_RESERVE, 32)
        assert tcp <= configured
        assert unix >= 16
        assert tcp >= 16

    def test_without_http_the_unix_socket_has_the_whole_budget(self):
        """With HTTP off, the Unix socket may use everything but the reserve."""
        assert connection_caps(256, 1024, http=False) == (1024 - FD_RESERVE, 0)


class TestTimeouts:
    async def test_half_a_request_line_is_closed_after_the_idle_timeout(self, start_agent):
        """A connection that sends half a request line and waits is closed, not held for
        ever."""
        agent = start_agent(env={"EDGELM_HTTP_IDLE_TIMEOUT_S": "1"})
        reader, writer = await asyncio.open_connection("127.0.0.1", agent.port)
        try:
            writer.write(b"GET /rea")
            await writer.drain()
            assert await read_until_closed(reader) == b""
        finally:
            writer.close()

    async def test_trickled_headers_do_not_reset_the_timeout(self, start_agent):
        """Headers sent a byte at a time must still be complete within the timeout."""
        agent = start_agent(env={"EDGELM_HTTP_IDLE_TIMEOUT_S": "1"})
        reader, writer = await asyncio.open_connection("127.0.0.1", agent.port)
        closed = False
        try:
            for byte in b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 600:
                writer.write(bytes([byte]))
                try:
                    await writer.drain()
                except ConnectionError:
                    closed = True
                    break
                await asyncio.sleep(0.05)
                if reader.at_eof():
                    closed = True
                    break
            if not closed:
                closed = await read_until_closed(reader) == b""
        finally:
            writer.close()
        assert closed

    async def test_an_idle_keep_alive_connection_is_closed(self, start_agent):
        """After a response, a keep-alive connection that stays idle is closed."""
        agent = start_agent(env={"EDGELM_HTTP_IDLE_TIMEOUT_S": "1"})
        reader, writer = await asyncio.open_connection("127.0.0.1", agent.port)
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            await writer.drain()
            response = await read_until_closed(reader)
            assert response.startswith(b"HTTP/1.1 200")
        finally:
            writer.close()

    async def test_a_body_that_never_arrives_is_a_408(self, start_agent):
        """A request whose body stops short gets 408 request_timeout, in JSON."""
        agent = start_agent(env={"EDGELM_HTTP_BODY_TIMEOUT_S": "1"})
        status, _, body = await raw_exchange(
            agent.port,
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"model"',
        )
        assert status == 408
        assert body["error"]["code"] == "request_timeout"  # type: ignore[index]


class TestConnectionCap:
    async def test_over_the_cap_gets_503_and_the_unix_socket_still_answers(self, start_agent):
        """With the TCP cap reached by connections that send nothing, one more TCP client
        gets 503 with Retry-After, the Unix socket answers, and TCP serves again once they
        close."""
        agent = start_agent(
            env={"EDGELM_MAX_HTTP_CONNECTIONS": "20", "EDGELM_HTTP_IDLE_TIMEOUT_S": "120"}
        )
        held: list[asyncio.StreamWriter] = []
        try:
            for _ in range(20):
                _, writer = await asyncio.open_connection("127.0.0.1", agent.port)
                writer.write(b"GET /rea")  # half a request line: held open, costs a slot
                held.append(writer)
            await asyncio.sleep(0)
            deadline = time.monotonic() + 60
            while True:  # the agent accepts them in its own time; wait until all count
                status, headers, body = await raw_exchange(
                    agent.port, b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                )
                if status == 503 and body["error"]["code"] == "too_many_connections":  # type: ignore[index]
                    break
                assert time.monotonic() < deadline, (status, body)
                await asyncio.sleep(0.05)
            assert headers["retry-after"] == "1"
            assert headers["content-type"] == "application/json"
            assert agent.request("GET", "/readyz")[0] == 200  # the Unix socket
        finally:
            for writer in held:
                writer.close()
        deadline = time.monotonic() + 60
        while True:
            status, _, _ = await raw_exchange(
                agent.port,
                b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
            )
            if status == 200:
                break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)

    def test_a_connection_flood_under_a_low_file_limit_leaves_the_socket_answering(
        self, start_agent
    ):
        """Under a hard limit of 256 open files, 400 idle TCP connections neither lock out
        the Unix socket nor flood the log: the cap keeps descriptors in reserve, and the
        refusals are logged at a limited rate."""
        limit = 256

        def low_limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        agent = start_agent(
            env={"EDGELM_HTTP_IDLE_TIMEOUT_S": "120"}, preexec_fn=low_limit, ready=True
        )
        [limits] = agent.log_events("open_files")
        assert limits["limit"] == limit
        assert limits["http_max_connections"] <= limit - 128
        flood: list[socket.socket] = []
        try:
            for _ in range(400):
                s = socket.create_connection(("127.0.0.1", agent.port))
                s.sendall(b"GET /rea")
                flood.append(s)
            assert agent.request("GET", "/readyz")[0] == 200
            assert agent.request("GET", "/v1/models")[0] == 200
        finally:
            for s in flood:
                s.close()
        refused_lines = agent.log_events("http_connection_refused")
        assert len(refused_lines) < 10, "refusals must be logged at a limited rate"
        assert agent.log_events("accept_failed") == []  # the reserve held: no EMFILE
        assert "Too many open files" not in agent.logs()

    async def test_a_unix_socket_flood_leaves_tcp_answering(self, start_agent):
        """Under a hard limit of 256 open files, 400 idle Unix connections cannot use up the
        descriptors: the Unix socket is capped too (503 past it), TCP keeps its share, and
        nothing runs out of descriptors."""
        limit = 256

        def low_limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        agent = start_agent(env={"EDGELM_HTTP_IDLE_TIMEOUT_S": "120"}, preexec_fn=low_limit)
        [limits] = agent.log_events("open_files")
        assert limits["unix_max_connections"] + limits["http_max_connections"] <= limit - 128
        flood: list[socket.socket] = []
        try:
            for _ in range(400):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(agent.socket))
                s.sendall(b"GET /rea")
                flood.append(s)
            deadline = time.monotonic() + 60
            while True:  # the agent accepts them in its own time; wait until all count
                try:
                    status, _, body = await unix_exchange(
                        agent.socket, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"
                    )
                except ConnectionResetError:  # refused at once while refusals still linger
                    status, body = 0, {}
                if status == 503:
                    break
                assert time.monotonic() < deadline, (status, body)
                await asyncio.sleep(0.05)
            assert body["error"]["code"] == "too_many_connections"  # type: ignore[index]
            status, _, _ = await raw_exchange(
                agent.port,
                b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
            )
            assert status == 200
        finally:
            for s in flood:
                s.close()
        assert agent.log_events("accept_failed") == []
        assert "Too many open files" not in agent.logs()

    def test_the_soft_file_limit_is_raised_at_start(self, start_agent):
        """A soft limit below the hard one (systemd starts services at 1,024) is raised."""

        def soft_below_hard() -> None:
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, min(hard, 4096)))

        agent = start_agent(preexec_fn=soft_below_hard)
        [limits] = agent.log_events("open_files")
        assert limits["limit"] > 256


MALFORMED = [
    pytest.param(
        b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
        431,
        "header_too_large",
        id="oversized-header",
    ),
    pytest.param(
        b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + b"".join(b"X-H%d: v\r\n" % i for i in range(200))
        + b"\r\n",
        431,
        "too_many_headers",
        id="too-many-headers",
    ),
    pytest.param(
        b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n",
        400,
        "bad_http_request",
        id="duplicate-host",
    ),
    pytest.param(b"GET\x01 / HTTP/1.1\r\n\r\n", 400, "bad_request_line", id="bad-request-line"),
    pytest.param(
        b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n",
        400,
        "bad_header",
        id="bad-content-length",
    ),
]


class TestExpect:
    async def test_an_unknown_expectation_is_refused_in_json_after_the_host_check(
        self, start_agent
    ):
        """``Expect: 999-nope`` gets the access checks (a foreign Host is 403) and then a JSON
        417, logged like every request; ``Expect: 100-continue`` still works."""
        agent = start_agent(None, ready=False).wait_alive()
        body = b'{"request": {"model": "m", "prompt": "hi", "max_tokens": 2}}'

        def post(host: bytes, expect: bytes) -> bytes:
            return (
                b"POST /v1/jobs HTTP/1.1\r\nHost: " + host + b"\r\nExpect: " + expect
                + b"\r\nConnection: close\r\nContent-Type: application/json\r\n"
                + b"Content-Length: %d\r\n\r\n" % len(body) + body
            )  # fmt: skip

        status, headers, answer = await raw_exchange(agent.port, post(b"evil.example", b"999-nope"))
        assert status == 403
        assert answer["error"]["code"] == "host_not_allowed"  # type: ignore[index]
        host = f"127.0.0.1:{agent.port}".encode()
        status, headers, answer = await raw_exchange(agent.port, post(host, b"999-nope"))
        assert status == 417
        assert headers["content-type"].startswith("application/json")
        assert answer["error"]["code"] == "expectation_failed"  # type: ignore[index]
        assert 417 in [e["status"] for e in agent.log_events("request_finished")]
        reader, writer = await asyncio.open_connection("127.0.0.1", agent.port)
        try:
            writer.write(post(host, b"100-continue"))
            await writer.drain()
            raw = await read_until_closed(reader)
        finally:
            writer.close()
        assert raw.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 ")
        assert b"expectation_failed" not in raw


class TestMalformedHttp:
    @pytest.mark.parametrize(("payload", "status", "code"), MALFORMED)
    async def test_parser_errors_get_the_json_error_body(self, start_agent, payload, status, code):
        """What aiohttp's parser refuses is answered like every other error: JSON, with a
        code, and no traceback in the log."""
        agent = start_agent(None, ready=False).wait_alive()
        got_status, headers, body = await raw_exchange(agent.port, payload)
        assert got_status == status
        assert headers["content-type"].startswith("application/json")
        error = body["error"]
        assert isinstance(error, dict)
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == code
        assert agent.request("GET", "/healthz")[0] == 200
        assert "Traceback" not in agent.logs()
