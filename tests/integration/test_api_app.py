"""The HTTP layer in-process, over a real socket, with a backend that can be made to fail.

A runtime that dies mid-generation cannot be produced on demand with llama.cpp, so these tests
serve the real application over a real TCP socket with the fake backend in front.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestServer

from edgelm_agent.api.access import HttpAccessPolicy
from edgelm_agent.api.app import create_app
from edgelm_agent.api.context import ApiContext
from edgelm_agent.config import HttpListen
from edgelm_agent.inference.scheduler import Scheduler, SchedulerHooks
from edgelm_agent.metrics import AgentMetrics
from edgelm_agent.serving import FailureStreak, ModelHost, ServingModel
from tests.agent_process import free_port
from tests.fake_backend import FakeBackend


class Served:
    def __init__(self, server: TestServer, backend: FakeBackend, host: ModelHost) -> None:
        self.server = server
        self.backend = backend
        self.host = host
        self.url = f"http://127.0.0.1:{server.port}"


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    backend = FakeBackend(["Hel", "lo", " there"])
    health = FailureStreak()
    scheduler = Scheduler(
        backend,
        max_queue=4,
        retry_after_s=1,
        hooks=SchedulerHooks(
            on_finished=lambda _: health.succeeded(), on_failed=lambda _: health.failed()
        ),
    )
    host = ModelHost()
    host.set_active(ServingModel(backend, scheduler, context_length=64, health=health))
    server = TestServer(
        create_app(ApiContext(host, AgentMetrics(), 1 << 20, None)), host="127.0.0.1"
    )
    await server.start_server()
    yield Served(server, backend, host)
    await server.close()
    await scheduler.close()


BODY = {"model": "fake", "prompt": "hi", "max_tokens": 10}


class TestRuntimeFailure:
    async def test_failure_mid_stream_ends_with_an_error_event(self, served):
        """A runtime failing after some tokens: the stream carries an error event and ends."""
        served.backend.fail_after = 2
        async with (
            aiohttp.ClientSession() as s,
            s.post(served.url + "/v1/completions", json={**BODY, "stream": True}) as r,
        ):
            assert r.status == 200  # headers were out before the failure
            lines = [line async for line in r.content if line.strip()]
        events = [json.loads(line[6:]) for line in lines if line != b"data: [DONE]\n"]
        assert [e["choices"][0]["text"] for e in events[:-1]] == ["Hel", "lo"]
        assert events[-1]["error"]["code"] == "backend_error"
        assert b"data: [DONE]\n" not in lines  # an incomplete answer is not marked complete

    async def test_openai_client_raises_on_the_error_event(self, served):
        """The official client turns the error event into an APIError, no hang."""
        served.backend.fail_after = 1
        client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIError, match="runtime exploded"):
            async for _ in await client.completions.create(
                model="fake", prompt="hi", max_tokens=5, stream=True
            ):
                pass
        await client.close()

    async def test_failure_before_first_token_is_a_json_500(self, served):
        """A runtime failing before any token gives a normal JSON 500 without a traceback."""
        served.backend.fail_after = 0
        async with (
            aiohttp.ClientSession() as s,
            s.post(served.url + "/v1/completions", json={**BODY, "stream": True}) as r,
        ):
            assert r.status == 500
            body = await r.json()
        assert body["error"]["code"] == "backend_error"
        assert "Traceback" not in body["error"]["message"]

    async def test_repeated_failures_make_the_agent_unready_until_one_succeeds(self, served):
        """Three failures in a row turn /readyz to 503 degraded; a success clears it."""
        served.backend.fail_after = 0
        async with aiohttp.ClientSession() as s:
            for _ in range(3):
                async with s.post(served.url + "/v1/completions", json=BODY) as r:
                    assert r.status == 500
            assert (await readyz_becomes(s, served.url, 503))["status"] == "degraded"
            served.backend.fail_after = None
            async with s.post(served.url + "/v1/completions", json=BODY) as r:
                assert r.status == 200
            await readyz_becomes(s, served.url, 200)


async def readyz_becomes(s: aiohttp.ClientSession, url: str, status: int) -> Any:
    """/readyz's body once it answers ``status``. The streak is counted when the worker thread
    hands the model back, which can be just after the client has its response."""
    deadline = time.monotonic() + 10
    while True:
        async with s.get(url + "/readyz") as r:
            if r.status == status:
                return await r.json()
        assert time.monotonic() < deadline, f"/readyz never answered {status}"
        await asyncio.sleep(0.01)


class TestHeaders:
    async def test_streamed_responses_carry_the_request_id(self, served):
        """X-Request-Id is echoed on SSE responses too."""
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                served.url + "/v1/completions",
                json={**BODY, "stream": True},
                headers={"X-Request-Id": "trace-42"},
            ) as r,
        ):
            await r.read()
            assert r.headers["X-Request-Id"] == "trace-42"

    async def test_get_one_model(self, served):
        """GET /v1/models/{id} returns the model card, and 404 for another id."""
        client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0)
        assert (await client.models.retrieve("fake")).id == "fake"
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("nope")
        await client.close()


class TestCors:
    async def test_preflight_from_an_allowed_origin(self):
        """A CORS preflight from an allowed origin gets 204 with the CORS headers, no token."""
        backend = FakeBackend(["ok"])
        scheduler = Scheduler(backend, max_queue=1, retry_after_s=1)
        host = ModelHost()
        host.set_active(ServingModel(backend, scheduler, context_length=64))
        port = free_port()
        policy = HttpAccessPolicy.for_listener(
            HttpListen("127.0.0.1", port), "tok", ("http://localhost:3000",)
        )
        server = TestServer(
            create_app(ApiContext(host, AgentMetrics(), 1 << 20, policy)),
            host="127.0.0.1",
            port=port,
        )
        await server.start_server()
        base = f"http://127.0.0.1:{port}"
        origin = {"Origin": "http://localhost:3000"}
        try:
            async with aiohttp.ClientSession() as s:
                async with s.options(
                    base + "/v1/completions",
                    headers={**origin, "Access-Control-Request-Method": "POST"},
                ) as r:
                    assert r.status == 204
                    assert r.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
                    assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
                async with s.post(
                    base + "/v1/completions",
                    json={**BODY, "model": "fake"},
                    headers={**origin, "Authorization": "Bearer tok"},
                ) as r:
                    assert r.status == 200
                    assert r.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
                async with s.options(
                    base + "/v1/completions", headers={"Origin": "https://evil.example"}
                ) as r:
                    assert r.status == 403
        finally:
            await server.close()
            await scheduler.close()


@pytest.fixture
async def with_origin() -> AsyncIterator[str]:
    """The app behind an access policy with a token and one allowed origin; its base URL."""
    backend = FakeBackend(["Hel", "lo"])
    scheduler = Scheduler(backend, max_queue=1, retry_after_s=1)
    host = ModelHost()
    host.set_active(ServingModel(backend, scheduler, context_length=64))
    port = free_port()
    policy = HttpAccessPolicy.for_listener(
        HttpListen("127.0.0.1", port), "tok", ("http://localhost:3000",)
    )
    server = TestServer(
        create_app(ApiContext(host, AgentMetrics(), 1 << 20, policy)), host="127.0.0.1", port=port
    )
    await server.start_server()
    yield f"http://127.0.0.1:{port}"
    await server.close()
    await scheduler.close()


ORIGIN = {"Origin": "http://localhost:3000"}
AUTH = {"Authorization": "Bearer tok"}


class TestCorsOnEveryResponse:
    @pytest.mark.parametrize(
        ("body", "headers", "status"),
        [
            pytest.param({**BODY, "model": "nope"}, AUTH, 404, id="model-not-found"),
            pytest.param({**BODY, "max_tokens": 0}, AUTH, 400, id="bad-field"),
            pytest.param(BODY, {"Authorization": "Bearer wrong"}, 401, id="wrong-token"),
        ],
    )
    async def test_errors_carry_cors_headers(self, with_origin, body, headers, status):
        """An allowed origin can read every error the agent answers, its Retry-After too."""
        async with (
            aiohttp.ClientSession() as s,
            s.post(with_origin + "/v1/completions", json=body, headers={**ORIGIN, **headers}) as r,
        ):
            assert r.status == status
            assert r.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
            assert "Retry-After" in r.headers["Access-Control-Expose-Headers"]

    async def test_a_stream_carries_cors_headers(self, with_origin):
        """A streamed answer, whose headers leave before the middleware sees it, carries
        them too: the kiosk's web app can stream."""
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                with_origin + "/v1/completions",
                json={**BODY, "model": "fake", "stream": True},
                headers={**ORIGIN, **AUTH},
            ) as r,
        ):
            await r.read()
            assert r.status == 200
            assert r.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"

    async def test_an_unknown_path_carries_cors_headers(self, with_origin):
        """aiohttp's own 404 for a path that does not exist is readable too."""
        async with (
            aiohttp.ClientSession() as s,
            s.get(with_origin + "/v1/nope", headers={**ORIGIN, **AUTH}) as r,
        ):
            assert r.status == 404
            assert r.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"

    async def test_a_refused_origin_gets_none(self, with_origin):
        """An origin that is not allowed gets its 403 without CORS headers."""
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                with_origin + "/v1/completions",
                json=BODY,
                headers={"Origin": "http://evil.example", **AUTH},
            ) as r,
        ):
            assert r.status == 403
            assert "Access-Control-Allow-Origin" not in r.headers
