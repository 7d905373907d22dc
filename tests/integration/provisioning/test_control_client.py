"""The REST client against a real aiohttp server started by each test: errors, uploads, events."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import BodyPartReader, web

from edgelm_provisioning.control_client import ControlClient
from edgelm_provisioning.errors import (
    ControlProtocolError,
    ControlRequestFailed,
    ControlUnreachable,
)
from edgelm_provisioning.model_source import Blob
from edgelm_provisioning.sse import ServerSentEvent, encode_event

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Serve = Callable[[str, str, Handler], Awaitable[str]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start an aiohttp server with one route; give its base URL. Stopped at teardown."""
    runners: list[web.AppRunner] = []

    async def start(method: str, path: str, handler: Handler) -> str:
        app = web.Application(client_max_size=64 << 20)  # uploads are read whole here
        app.router.add_route(method, path, handler)
        runner = web.AppRunner(app, shutdown_timeout=0.5)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


class TestJsonCalls:
    async def test_the_bearer_token_and_query_are_sent(self, serve):
        """Every call carries the bearer token; repeated query keys stay repeated."""

        async def handler(request: web.Request) -> web.Response:
            return web.json_response(
                {"auth": request.headers["Authorization"], "labels": request.query.getall("label")}
            )

        url = await serve("GET", "/api/v1/devices", handler)
        async with ControlClient(url, "s3cret") as client:
            answer = await client.get("/devices", [("label", "a=1"), ("label", "b=2")])
        assert answer == {"auth": "Bearer s3cret", "labels": ["a=1", "b=2"]}

    async def test_an_error_body_becomes_a_typed_error(self, serve):
        """The control plane's error body gives status, code, param and type as attributes."""

        async def handler(request: web.Request) -> web.Response:
            error = {"message": "no such rollout", "type": "not_found_error", "param": "id",
                     "code": "not_found"}  # fmt: skip
            return web.json_response({"error": error}, status=404)

        url = await serve("GET", "/api/v1/rollouts/x", handler)
        async with ControlClient(url, "t") as client:
            with pytest.raises(ControlRequestFailed) as caught:
                await client.get("/rollouts/x")
        error = caught.value
        assert (error.status_code, error.code, error.param) == (404, "not_found", "id")
        assert error.reference == "not_found"
        assert error.error_type == "not_found_error"
        assert error.message == "no such rollout"

    async def test_an_error_page_that_is_not_json_keeps_its_status(self, serve):
        """A proxy's HTML error page gives reference http-502 and says the status."""

        async def handler(request: web.Request) -> web.Response:
            return web.Response(
                text="<html>Bad Gateway</html>", status=502, content_type="text/html"
            )

        url = await serve("GET", "/api/v1/models", handler)
        async with ControlClient(url, "t") as client:
            with pytest.raises(ControlRequestFailed) as caught:
                await client.get("/models")
        assert caught.value.reference == "http-502"
        assert "502" in caught.value.message

    async def test_a_success_that_is_not_json_is_a_protocol_error(self, serve):
        """A 200 answer that is not JSON (the wrong server) is a ControlProtocolError."""

        async def handler(request: web.Request) -> web.Response:
            return web.Response(text="hello")

        url = await serve("GET", "/api/v1/models", handler)
        async with ControlClient(url, "t") as client:
            with pytest.raises(ControlProtocolError):
                await client.get("/models")

    async def test_nobody_listening_is_unreachable(self):
        """A closed port gives ControlUnreachable naming the URL."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{s.getsockname()[1]}"
        async with ControlClient(url, "t") as client:
            with pytest.raises(ControlUnreachable) as caught:
                await client.get("/devices")
        assert caught.value.url == f"{url}/api/v1/devices"

    async def test_no_answer_in_time_is_unreachable(self, serve):
        """A server that does not answer within the timeout gives ControlUnreachable."""
        never = asyncio.Event()

        async def handler(request: web.Request) -> web.Response:
            await never.wait()
            return web.json_response({})

        url = await serve("GET", "/api/v1/devices", handler)
        async with ControlClient(url, "t", timeout_s=0.2) as client:
            with pytest.raises(ControlUnreachable):
                await client.get("/devices")


class TestUpload:
    async def test_parts_come_in_order_named_by_sha256_with_progress(self, serve, tmp_path):
        """targets comes first, then each blob under its sha256; progress counts file bytes."""
        big = tmp_path / "model.gguf"
        big.write_bytes(bytes(range(256)) * 12_000)  # ~3 MB: several chunks
        big_sha = hashlib.sha256(big.read_bytes()).hexdigest()
        small = b'{"format":"edgelm-bundle/1"}'
        small_sha = hashlib.sha256(small).hexdigest()
        received: list[tuple[str, str]] = []

        async def handler(request: web.Request) -> web.Response:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                assert isinstance(part, BodyPartReader)
                assert part.name is not None
                received.append((part.name, hashlib.sha256(await part.read()).hexdigest()))
            return web.json_response({"ok": True}, status=201)

        url = await serve("POST", "/api/v1/models", handler)
        sent: list[int] = []
        blobs = [
            Blob(small_sha, len(small), "bundle.json", data=small),
            Blob(big_sha, big.stat().st_size, big.name, path=big),
        ]
        async with ControlClient(url, "t") as client:
            answer = await client.upload_model(b'{"signed": {}}', blobs, sent.append)
        assert answer == {"ok": True}
        assert [name for name, _ in received] == ["targets", small_sha, big_sha]
        assert dict(received)[big_sha] == big_sha
        assert sum(sent) == big.stat().st_size
        assert len(sent) > 1

    async def test_a_file_that_grew_since_hashing_sends_only_its_hashed_length(
        self, serve, tmp_path: Path
    ):
        """Bytes appended after hashing are not sent: the part keeps its declared length."""
        model = tmp_path / "model.gguf"
        model.write_bytes(b"GGUF" + b"x" * 100)
        blob = Blob(hashlib.sha256(model.read_bytes()).hexdigest(), 104, model.name, path=model)
        model.write_bytes(model.read_bytes() + b"appended")
        lengths: dict[str, int] = {}

        async def handler(request: web.Request) -> web.Response:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                assert isinstance(part, BodyPartReader)
                assert part.name is not None
                lengths[part.name] = len(await part.read())
            return web.json_response({}, status=201)

        url = await serve("POST", "/api/v1/models", handler)
        async with ControlClient(url, "t") as client:
            await client.upload_model(b"{}", [blob])
        assert lengths[blob.sha256] == 104


class TestEvents:
    async def test_events_are_decoded_and_the_opening_is_announced(self, serve):
        """The stream yields each event; on_open runs once the stream is established."""

        async def handler(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(b": keep-alive\n\n")
            await response.write(encode_event(ServerSentEvent("rollout", '{"id": "ro-1"}')))
            await response.write(encode_event(ServerSentEvent("device", '{"id": "k-1"}')))
            return response

        url = await serve("GET", "/api/v1/events", handler)
        opened: list[bool] = []
        async with ControlClient(url, "t") as client:
            events = [e async for e in client.events(on_open=lambda: opened.append(True))]
        assert [(e.event, e.data) for e in events] == [
            ("rollout", '{"id": "ro-1"}'),
            ("device", '{"id": "k-1"}'),
        ]
        assert opened == [True]

    async def test_a_refused_stream_is_an_error(self, serve):
        """A stream answered with an error status raises instead of yielding nothing."""

        async def handler(request: web.Request) -> web.Response:
            return web.json_response(
                {"error": {"message": "no", "code": "unavailable"}}, status=503
            )

        url = await serve("GET", "/api/v1/events", handler)
        async with ControlClient(url, "t") as client:
            with pytest.raises(ControlRequestFailed):
                _ = [e async for e in client.events()]
