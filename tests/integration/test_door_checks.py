"""Every input is checked at the door: text that is not valid Unicode, bad cursors, empty
prompts, oversized metadata, unknown models. Each answers a 4xx that names the field, and the
agent keeps serving, on both runtimes."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from tests.agent_process import AgentProcess

SURROGATE_JSON = '"h\\ud800i"'  # how a JavaScript app's cut emoji arrives: a JSON escape


async def post_raw(agent: AgentProcess, path: str, body: str) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(agent.base_url + path, data=body, headers={"Content-Type": "application/json"}) as r,
    ):
        return r.status, await r.json(content_type=None)


def assert_names(status: int, body: dict[str, Any], param: str) -> None:
    assert status == 400, body
    assert body["error"]["code"] == "invalid_request"
    assert body["error"]["param"] == param
    assert "not valid Unicode" in body["error"]["message"]


class TestUnicodeAtTheDoor:
    @pytest.mark.parametrize("stream", [False, True])
    async def test_chat_with_a_lone_surrogate_is_400(self, served, stream):
        """A chat message holding a lone surrogate is refused, streaming or not."""
        agent, model = served
        body = (
            f'{{"model": "{model}", "stream": {json.dumps(stream)}, "max_tokens": 2, '
            f'"messages": [{{"role": "user", "content": {SURROGATE_JSON}}}]}}'
        )
        assert_names(*await post_raw(agent, "/v1/chat/completions", body), "messages[0].content")

    @pytest.mark.parametrize("stream", [False, True])
    async def test_completion_with_a_lone_surrogate_is_400(self, served, stream):
        """A completion prompt holding a lone surrogate is refused, streaming or not."""
        agent, model = served
        body = (
            f'{{"model": "{model}", "stream": {json.dumps(stream)}, "max_tokens": 2, '
            f'"prompt": {SURROGATE_JSON}}}'
        )
        assert_names(*await post_raw(agent, "/v1/completions", body), "prompt")

    async def test_a_job_with_a_lone_surrogate_is_400_and_the_queue_keeps_running(self, served):
        """The job that used to stop the queue is refused at submission; the next job runs."""
        agent, model = served
        body = f'{{"request": {{"model": "{model}", "prompt": {SURROGATE_JSON}, "max_tokens": 2}}}}'
        assert_names(*await post_raw(agent, "/v1/jobs", body), "request.prompt")
        keyed = (
            f'{{"request": {{"model": "{model}", "prompt": "hi", "max_tokens": 2}}, '
            f'"idempotency_key": {SURROGATE_JSON}}}'
        )
        assert_names(*await post_raw(agent, "/v1/jobs", keyed), "idempotency_key")
        status, job = agent.request(
            "POST", "/v1/jobs", {"request": {"model": model, "prompt": "hi", "max_tokens": 2}}
        )
        assert status == 202
        async with asyncio.timeout(120):
            while job["state"] not in ("succeeded", "failed", "dead"):
                await asyncio.sleep(0.05)
                job = agent.request("GET", f"/v1/jobs/{job['id']}")[1]
        assert job["state"] == "succeeded"

    async def test_raw_non_utf8_bytes_in_the_path_or_query_are_400(self, served):
        """Bytes that are not UTF-8 in the request line reach no handler."""
        agent, _ = served
        for target in (b"/v1/jobs/\xff\xfe", b"/v1/jobs?state=\xff"):
            reader, writer = await asyncio.open_connection("127.0.0.1", agent.port)
            writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            writer.close()
            assert head.split()[1] in (b"400", b"404"), head
        assert agent.request("GET", "/readyz")[0] == 200


class TestJobFieldsAtTheDoor:
    @pytest.mark.parametrize(
        ("query", "param"),
        [
            ("cursor=99999999999999999999999", "cursor"),
            ("cursor=garbage", "cursor"),
            ("cursor=-1", "cursor"),
            ("limit=0", "limit"),
            ("limit=abc", "limit"),
        ],
    )
    def test_bad_cursors_and_limits_name_their_field(self, served, query, param):
        """A cursor out of range or not a number is a 400 that blames the cursor."""
        agent, _ = served
        status, body = agent.request("GET", f"/v1/jobs?{query}")
        assert status == 400
        assert body["error"]["param"] == param

    def test_metadata_limit_counts_utf8_bytes(self, served):
        """16 KiB of metadata means 16 KiB of UTF-8: 4,000 CJK characters (12 KB) fit."""
        agent, model = served
        request = {"model": model, "prompt": "hi", "max_tokens": 1}
        cjk = {"note": "漢" * 4000}
        status, _ = agent.request("POST", "/v1/jobs", {"request": request, "metadata": cjk})
        assert status == 202
        too_big = {"note": "漢" * 6000}  # 18 KB
        status, body = agent.request("POST", "/v1/jobs", {"request": request, "metadata": too_big})
        assert status == 400
        assert body["error"]["param"] == "metadata"

    def test_a_job_for_an_unknown_model_is_404_unless_it_may_wait(self, served):
        """A job for a model the device neither has nor is offered is refused at once; with
        wait_for_model it is accepted and waits."""
        agent, _ = served
        request = {"model": "no-such-model", "prompt": "hi", "max_tokens": 1}
        status, body = agent.request("POST", "/v1/jobs", {"request": request})
        assert status == 404
        assert body["error"]["code"] == "model_not_found"
        status, job = agent.request(
            "POST", "/v1/jobs", {"request": request, "wait_for_model": True}
        )
        assert status == 202
        assert agent.request("GET", f"/v1/jobs/{job['id']}")[1]["state"] == "queued"
        agent.request("DELETE", f"/v1/jobs/{job['id']}")

    def test_an_empty_prompt_is_400_on_every_runtime(self, served):
        """The empty prompt answers the same on llama.cpp and onnxruntime-genai."""
        agent, model = served
        status, body = agent.request("POST", "/v1/completions", {"model": model, "prompt": ""})
        assert status == 400
        assert body["error"]["param"] == "prompt"


class TestDefaults:
    def test_a_request_without_max_tokens_stops_at_the_default(self, start_agent):
        """A request that sets no max_tokens stops at default_max_tokens, not at the end of
        the context."""
        agent = start_agent(env={"EDGELM_DEFAULT_MAX_TOKENS": "7"})
        status, body = agent.request(
            "POST",
            "/v1/completions",
            {"model": "tiny-llama", "prompt": "hello", "temperature": 0},
        )
        assert status == 200
        assert body["usage"]["completion_tokens"] <= 7
        assert body["choices"][0]["finish_reason"] == "length"

    def test_models_report_where_they_run(self, served):
        """/v1/models says whether the runtime offloads to a GPU and how."""
        agent, _ = served
        (card,) = agent.request("GET", "/v1/models")[1]["data"]
        accelerator = card["accelerator"]
        assert accelerator["gpu_offload"] is False
        if card["backend"] == "llama.cpp":
            assert accelerator["gpu_layers"] == 0  # a CPU build: nothing to offload
        else:
            assert accelerator["execution_provider"] == "cpu"
