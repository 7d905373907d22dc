"""Bad input and refused callers get OpenAI-style errors, and the agent keeps serving."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import aiohttp
import pytest

from tests.agent_process import TINY_ONNX, AgentProcess


def chat_body(model: str, **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], **extra}


async def post(
    url: str, data: bytes | str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, object], dict[str, str]]:
    async with aiohttp.ClientSession() as s, s.post(url, data=data, headers=headers) as r:
        return r.status, await r.json(content_type=None), dict(r.headers)


def assert_openai_error(body: dict[str, object], code: str) -> None:
    error = body["error"]
    assert isinstance(error, dict)
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert "Traceback" not in str(error["message"])


@pytest.fixture
def agent(start_agent: Callable[..., AgentProcess]) -> AgentProcess:
    return start_agent(extra_args=["--max-queue", "1"], env={"EDGELM_MAX_BODY_BYTES": "4096"})


async def still_serving(agent: AgentProcess) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(agent.base_url + "/readyz") as r:
            assert r.status == 200
        async with s.post(
            agent.base_url + "/v1/completions",
            json={"model": "tiny-llama", "prompt": "hi", "max_tokens": 2},
        ) as r:
            assert r.status == 200


class TestMalformedRequests:
    @pytest.mark.parametrize(
        ("data", "code"),
        [
            (b"{not json", "invalid_request"),
            (b"[1, 2]", "invalid_request"),
            (b"\xff\xfe\x00", "invalid_request"),
            (json.dumps({"messages": []}), "invalid_request"),
            (json.dumps({"model": "tiny-llama"}), "invalid_request"),
            (json.dumps(chat_body("tiny-llama", temperature="hot")), "invalid_request"),
            (json.dumps(chat_body("nope")), "model_not_found"),
            (json.dumps(chat_body("tiny-llama", max_tokens=10**6)), "context_length_exceeded"),
        ],
    )
    async def test_bad_bodies_get_4xx_json(self, agent, data, code):
        """Each malformed body gets a 4xx with an OpenAI error body naming the fault."""
        status, body, _ = await post(
            agent.base_url + "/v1/chat/completions", data, {"Content-Type": "application/json"}
        )
        assert status == (404 if code == "model_not_found" else 400)
        assert_openai_error(body, code)
        await still_serving(agent)

    async def test_oversized_body_is_413(self, agent):
        """A body over max_body_bytes gets 413, and the agent stays up."""
        big = json.dumps(chat_body("tiny-llama", padding="x" * 10_000))
        status, body, _ = await post(
            agent.base_url + "/v1/chat/completions", big, {"Content-Type": "application/json"}
        )
        assert status == 413
        assert_openai_error(body, "payload_too_large")
        await still_serving(agent)

    async def test_unknown_route_and_wrong_method(self, agent):
        """Unknown paths give a JSON 404 and wrong methods a JSON 405."""
        async with aiohttp.ClientSession() as s:
            async with s.get(agent.base_url + "/v1/nothing") as r:
                assert r.status == 404
                assert_openai_error(await r.json(), "not_found")
            async with s.get(agent.base_url + "/v1/chat/completions") as r:
                assert r.status == 405
                assert_openai_error(await r.json(), "method_not_allowed")

    async def test_empty_prompt_is_400_on_onnx(self, start_agent):
        """An empty prompt that tokenizes to nothing is refused before reaching the runtime."""
        onnx = start_agent(TINY_ONNX)
        status, body, _ = await post(
            onnx.base_url + "/v1/completions", json.dumps({"model": "tiny-onnx", "prompt": ""})
        )
        assert status == 400
        assert_openai_error(body, "invalid_request")


class TestBusy:
    async def test_full_queue_answers_429_with_retry_after(self, start_agent):
        """With one running and max_queue=1 waiting, the next request gets 429 at once."""
        agent = start_agent(extra_args=["--max-queue", "1", "--context-length", "16384"])
        url = agent.base_url + "/v1/completions"
        short = {"model": "tiny-llama", "prompt": "hello", "max_tokens": 4, "temperature": 0}
        async with aiohttp.ClientSession() as s:
            # A long stream holds the model for tens of seconds, however slow the machine.
            holder = await s.post(url, json={**short, "max_tokens": 16000, "stream": True})
            await holder.content.readline()

            async def call() -> int:
                async with s.post(url, json=short) as r:
                    await r.read()
                    return r.status

            waiting = asyncio.create_task(call())
            deadline = time.monotonic() + 60
            while True:
                async with s.get(agent.base_url + "/readyz") as r:
                    state = await r.json()
                if state["queue_depth"] == 1:
                    break
                assert time.monotonic() < deadline, f"queue never filled: {state}"
                await asyncio.sleep(0.01)
            async with s.post(url, json=short) as r:
                assert r.status == 429
                assert r.headers["Retry-After"] == "1"
                assert_openai_error(await r.json(), "queue_full")
            holder.close()  # hanging up frees the model for the waiting request
            assert await waiting == 200
        await still_serving(agent)


class TestHttpListenerSecurity:
    async def test_foreign_host_header_is_refused(self, agent):
        """DNS rebinding: a request whose Host is not loopback gets 403."""
        async with (
            aiohttp.ClientSession() as s,
            s.get(agent.base_url + "/v1/models", headers={"Host": "evil.example:80"}) as r,
        ):
            assert r.status == 403
            assert_openai_error(await r.json(), "host_not_allowed")

    async def test_foreign_origin_is_refused(self, agent):
        """A cross-site browser request (foreign Origin) gets 403."""
        status, body, _ = await post(
            agent.base_url + "/v1/completions",
            json.dumps({"model": "tiny-llama", "prompt": "hi"}),
            {"Origin": "https://evil.example"},
        )
        assert status == 403
        assert_openai_error(body, "host_not_allowed")

    async def test_unix_socket_ignores_host_header(self, agent):
        """The Unix socket is guarded by file mode, so any Host header is fine there."""
        async with agent.unix_session() as s, s.get("http://evil.example/v1/models") as r:
            assert r.status == 200

    async def test_token_required_when_configured(self, start_agent):
        """With EDGELM_API_TOKEN set, HTTP needs the bearer token; the socket does not."""
        agent = start_agent(env={"EDGELM_API_TOKEN": "s3cret"})
        async with aiohttp.ClientSession() as s:
            async with s.get(agent.base_url + "/v1/models") as r:
                assert r.status == 401
                assert_openai_error(await r.json(), "invalid_api_key")
            async with s.get(
                agent.base_url + "/v1/models", headers={"Authorization": "Bearer s3cret"}
            ) as r:
                assert r.status == 200
        async with agent.unix_session() as s, s.get("http://localhost/v1/models") as r:
            assert r.status == 200

    def test_non_loopback_bind_without_token_refuses_to_start(self, start_agent):
        """Binding 0.0.0.0 without an API token exits non-zero with a clear message."""
        agent = start_agent(ready=False, extra_args=["--http", "0.0.0.0:0"])
        assert agent.wait() == 1
        assert "set api_token" in agent.logs()
        assert not agent.socket.exists()
