"""Streaming behaviour: concurrency, disconnects, UTF-8 across tokens, end of sequence."""

from __future__ import annotations

import asyncio
import json
import re
import time

import aiohttp
import openai
import pytest

from tests.agent_process import TINY_GGUF, TINY_ONNX, AgentProcess

URL = "http://localhost/v1/completions"


async def stream_texts(
    session: aiohttp.ClientSession, url: str, body: dict[str, object]
) -> tuple[list[str], str | None]:
    """POST a streaming request and return the text pieces and the finish reason."""
    pieces: list[str] = []
    reason = None
    async with session.post(url, json={**body, "stream": True}) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            if line.startswith(b"data: [DONE]"):
                return pieces, reason
            if line.startswith(b"data: "):
                choice = json.loads(line[6:])["choices"][0]
                piece = choice.get("text", choice.get("delta", {}).get("content"))
                if piece:
                    pieces.append(piece)
                reason = choice["finish_reason"] or reason
    raise AssertionError("stream ended without [DONE]")


def tokens_generated(metrics_text: str) -> float:
    match = re.search(
        r'^edgelm_tokens_generated_total\{model="[^"]+"\} (\S+)$', metrics_text, re.MULTILINE
    )
    return float(match.group(1)) if match else 0.0


class TestConcurrentClients:
    @pytest.mark.parametrize("model", ["gguf", "onnx"])
    async def test_eight_streaming_clients_all_get_complete_answers(self, start_agent, model):
        """Eight concurrent streams each get the full, correct greedy answer."""
        agent = start_agent(TINY_ONNX if model == "onnx" else TINY_GGUF)
        model_id = "tiny-onnx" if model == "onnx" else "tiny-llama"
        client = openai.AsyncOpenAI(base_url=agent.base_url + "/v1", api_key="x", max_retries=0)
        prompts = ["hello", "the", "hi", "good", "cafe", "hello world", "a", "the end"]

        async def ask(prompt: str, stream: bool) -> tuple[str, str]:
            if not stream:
                r = await client.completions.create(
                    model=model_id, prompt=prompt, max_tokens=40, temperature=0
                )
                return r.choices[0].text, r.choices[0].finish_reason
            text, reason = "", ""
            async for chunk in await client.completions.create(
                model=model_id, prompt=prompt, max_tokens=40, temperature=0, stream=True
            ):
                text += chunk.choices[0].text
                if chunk.choices[0].finish_reason:
                    reason = chunk.choices[0].finish_reason
            return text, reason

        expected = [await ask(p, stream=False) for p in prompts]  # one at a time
        results = await asyncio.gather(*(ask(p, stream=True) for p in prompts))
        assert results == expected
        await client.close()


class TestDisconnect:
    async def test_disconnect_mid_stream_frees_the_model(self, start_agent):
        """A client that leaves mid-stream stops its generation; the next request runs."""
        agent = start_agent(extra_args=["--context-length", "16384"])
        async with agent.unix_session() as s:
            async with s.get("http://localhost/metrics") as r:
                before = tokens_generated(await r.text())
            response = await s.post(
                URL,
                json={
                    "model": "tiny-llama",
                    "prompt": "hello",
                    "max_tokens": 16000,
                    "stream": True,
                },
            )
            await response.content.readline()  # the first event: generation is running
            response.close()  # hang up
            # The next request gets the model, and the abandoned run was cut short.
            r = await s.post(
                URL,
                json={"model": "tiny-llama", "prompt": "good", "max_tokens": 5, "temperature": 0},
            )
            body = await r.json()
            assert r.status == 200
            assert body["choices"][0]["text"] == " bye"
            async with s.get("http://localhost/metrics") as r:
                generated = tokens_generated(await r.text()) - before
        assert generated < 16000
        [cancelled] = agent.log_events("generation_cancelled")
        assert cancelled["completion_tokens"] < 16000

    async def test_disconnect_while_queued_frees_the_place(self, start_agent):
        """A client that leaves while waiting in the queue gives its place back."""
        agent = start_agent(extra_args=["--context-length", "16384", "--max-queue", "1"])
        async with agent.unix_session() as s:
            running = await s.post(
                URL,
                json={
                    "model": "tiny-llama",
                    "prompt": "hello",
                    "max_tokens": 16000,
                    "stream": True,
                },
            )
            await running.content.readline()
            queued = asyncio.create_task(
                s.post(URL, json={"model": "tiny-llama", "prompt": "hi", "max_tokens": 2})
            )
            await until_queue_depth(s, 1, "the second request never queued")
            queued.cancel()  # the waiting client gives up
            with pytest.raises(asyncio.CancelledError):
                await queued
            await until_queue_depth(s, 0, "the abandoned request kept its place in the queue")
            running.close()


async def until_queue_depth(s: aiohttp.ClientSession, depth: int, failure: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        async with s.get("http://localhost/readyz") as r:
            if (await r.json())["queue_depth"] == depth:
                return
        assert time.monotonic() < deadline, failure
        await asyncio.sleep(0.01)


class TestText:
    async def test_multibyte_characters_split_across_tokens_stream_as_valid_utf8(self, start_agent):
        """'é' and '👋' arrive over 2 and 4 byte tokens; every streamed piece is whole text."""
        agent = start_agent()
        async with agent.unix_session() as s:
            pieces, reason = await stream_texts(
                s, URL, {"model": "tiny-llama", "prompt": "cafe", "max_tokens": 8, "temperature": 0}
            )
        assert reason == "length"
        assert "".join(pieces).startswith("é👋")
        assert "\ufffd" not in "".join(pieces)
        assert "é" in pieces
        assert "👋" in pieces

    @pytest.mark.parametrize("model", ["gguf", "onnx"])
    async def test_end_of_sequence_finishes_with_stop(self, start_agent, model):
        """When the model emits its end-of-sequence token the reason is 'stop'."""
        if model == "onnx":
            agent = start_agent(TINY_ONNX)
            body = {"model": "tiny-onnx", "prompt": "sea is", "max_tokens": 400, "temperature": 0}
        else:
            agent = start_agent()
            body = {"model": "tiny-llama", "prompt": "good", "max_tokens": 400, "temperature": 0}
        async with agent.unix_session() as s:
            pieces, reason = await stream_texts(s, URL, body)
            async with s.post(URL, json=body) as r:
                whole = await r.json()
        assert reason == "stop"
        assert whole["choices"][0]["finish_reason"] == "stop"
        assert whole["usage"]["completion_tokens"] < 400
        assert whole["choices"][0]["text"] == "".join(pieces)
        if model == "gguf":
            assert whole["choices"][0]["text"] == " bye"


class TestChatCli:
    def test_edgelm_chat_streams_the_reply(self, start_agent):
        """`edgelm chat` reaches the agent over its socket and prints the streamed reply."""
        import subprocess
        import sys

        agent: AgentProcess = start_agent()
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "edgelm_cli",
                "chat",
                "--socket",
                str(agent.socket),
                "--max-tokens",
                "5",
                "--temperature",
                "0",
                "hi",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "hello been from and who"

    def test_edgelm_chat_without_agent_explains(self, short_tmp):
        """With no agent on the socket, `edgelm chat` says so and how to fix it."""
        import subprocess
        import sys

        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "edgelm_cli",
                "chat",
                "--socket",
                str(short_tmp / "none.sock"),
                "hi",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 1
        assert "cannot reach the agent" in result.stderr
        assert "edgelm agent run" in result.stderr
        assert "Traceback" not in result.stderr
