"""The official openai client against a running agent, on both runtimes."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.agent_process import AgentProcess


@pytest.fixture(scope="module")
def client(served: tuple[AgentProcess, str]) -> openai.OpenAI:
    agent, _ = served
    return openai.OpenAI(base_url=agent.base_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model_id(served: tuple[AgentProcess, str]) -> str:
    return served[1]


def error_body(exc: openai.APIStatusError) -> dict[str, Any]:
    """The openai client exposes the parsed `error` object as `body`."""
    assert isinstance(exc.body, dict)
    return exc.body


HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there"}]


class TestModels:
    def test_lists_the_loaded_model(self, client, model_id):
        """/v1/models lists exactly the model the agent serves."""
        assert [m.id for m in client.models.list().data] == [model_id]


class TestChatCompletions:
    def test_non_streaming_reply_has_usage_and_finish_reason(self, client, model_id):
        """A plain chat call returns text, usage and finish_reason 'length' at max_tokens."""
        reply = client.chat.completions.create(
            model=model_id, messages=HELLO, max_tokens=12, temperature=0
        )
        choice = reply.choices[0]
        assert choice.message.role == "assistant"
        assert choice.message.content
        assert choice.finish_reason == "length"
        assert reply.usage.completion_tokens == 12
        assert reply.usage.prompt_tokens > 0
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12

    def test_stream_matches_the_non_streaming_text(self, client, model_id):
        """Greedy streaming yields the same text as the same request without streaming."""
        whole = (
            client.chat.completions.create(
                model=model_id, messages=HELLO, max_tokens=20, temperature=0
            )
            .choices[0]
            .message.content
        )
        chunks = list(
            client.chat.completions.create(
                model=model_id,
                messages=HELLO,
                max_tokens=20,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole
        assert chunks[0].choices[0].delta.role == "assistant"
        finals = [
            c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
        ]
        assert finals == ["length"]
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 20

    def test_seed_makes_sampling_reproducible(self, client: openai.OpenAI, model_id: str):
        """Two sampled requests with the same seed give the same text."""

        def sample(seed: int) -> str | None:
            return (
                client.chat.completions.create(
                    model=model_id,
                    messages=HELLO,
                    max_tokens=16,
                    temperature=1.0,
                    top_p=1.0,
                    seed=seed,
                )
                .choices[0]
                .message.content
            )

        assert sample(7) == sample(7)

    def test_top_k_extension_is_accepted(self, client, model_id):
        """top_k, an extension to the OpenAI API, passes through extra_body."""
        reply = client.chat.completions.create(
            model=model_id, messages=HELLO, max_tokens=4, temperature=0.7, extra_body={"top_k": 1}
        )
        assert reply.usage.completion_tokens == 4

    def test_stop_string_ends_the_reply_before_it(self, client, model_id):
        """A stop string taken from the model's own greedy output cuts the reply there."""
        full = (
            client.chat.completions.create(
                model=model_id, messages=HELLO, max_tokens=20, temperature=0
            )
            .choices[0]
            .message.content
        )
        stop = full[len(full) // 2 : len(full) // 2 + 3]
        assert stop.strip(), f"need a non-blank stop string from {full!r}"
        reply = client.chat.completions.create(
            model=model_id, messages=HELLO, max_tokens=20, temperature=0, stop=[stop]
        )
        assert reply.choices[0].finish_reason == "stop"
        assert reply.choices[0].message.content == full[: full.find(stop)]


class TestCompletions:
    def test_non_streaming(self, client, model_id):
        """/v1/completions returns text with usage."""
        reply = client.completions.create(
            model=model_id, prompt="hello", max_tokens=8, temperature=0
        )
        assert reply.object == "text_completion"
        assert reply.choices[0].text
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage.completion_tokens == 8

    def test_streaming_ends_with_done_and_matches(self, client, model_id):
        """Streamed completion text equals the non-streamed text."""
        whole = (
            client.completions.create(model=model_id, prompt="hello", max_tokens=8, temperature=0)
            .choices[0]
            .text
        )
        stream = client.completions.create(
            model=model_id, prompt="hello", max_tokens=8, temperature=0, stream=True
        )
        assert "".join(c.choices[0].text for c in stream if c.choices) == whole


class TestErrors:
    def test_unknown_model_is_404(self, client):
        """An unknown model id gives 404 with code model_not_found."""
        with pytest.raises(openai.NotFoundError) as info:
            client.chat.completions.create(model="nope", messages=HELLO)
        assert error_body(info.value)["code"] == "model_not_found"

    def test_a_model_named_with_its_version_is_the_same_model(self, client, model_id, served):
        """``name@version`` of the model serving answers like ``name``; another version of
        it is a 404 naming what there is (the agent never serves a version it does not run)."""
        agent, _ = served
        _, registry = agent.request("GET", "/v1/registry/models")
        active = registry["active"]
        assert active.startswith(f"{model_id}@")
        reply = client.completions.create(model=active, prompt="hi", max_tokens=2)
        assert reply.choices[0].text is not None
        with pytest.raises(openai.NotFoundError) as info:
            client.completions.create(model=f"{model_id}@0.0.0-other", prompt="hi", max_tokens=2)
        assert error_body(info.value)["code"] == "model_not_found"

    def test_context_overflow_is_400(self, client, model_id):
        """prompt + max_tokens beyond the context gives 400 context_length_exceeded."""
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=model_id, prompt="hello", max_tokens=100_000)
        body = error_body(info.value)
        assert body["code"] == "context_length_exceeded"
        assert "exceeds the context length" in body["message"]
