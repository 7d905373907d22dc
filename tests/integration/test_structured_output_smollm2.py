"""Structured output and a tool round trip on SmolLM2, a real model (skipped without it).

``make model`` fetches it into ``models/``. On a real model the constraint must not only hold
but leave the model its sense: the answers are checked for content, not only for shape.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from tests.agent_process import REPO, AgentProcess

SMOLLM2 = REPO / "models" / "SmolLM2-135M-Instruct-Q4_1.gguf"

pytestmark = [
    pytest.mark.llama,
    pytest.mark.slow,
    pytest.mark.skipif(not SMOLLM2.is_file(), reason="SmolLM2 is not fetched (make model)"),
]

CITY: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "country": {"type": "string", "maxLength": 40},
        "population": {"type": "integer", "minimum": 0},
        "landmarks": {
            "type": "array",
            "items": {"type": "string", "maxLength": 40},
            "minItems": 1,
            "maxItems": 3,
        },
    },
    "required": ["city", "country", "population", "landmarks"],
}
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def client() -> Iterator[tuple[openai.OpenAI, str]]:
    workdir = Path(tempfile.mkdtemp(prefix="edgelm-", dir="/tmp"))
    agent = AgentProcess(workdir, model=SMOLLM2).wait_ready()
    try:
        api = openai.OpenAI(base_url=agent.base_url + "/v1", api_key="unused", max_retries=0)
        yield api, api.models.list().data[0].id
    finally:
        agent.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_schema_reply_validates_and_makes_sense(client):
    """Greedy SmolLM2 under a nested schema writes a valid document about the city asked."""
    api, model = client
    reply = api.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        max_tokens=200,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}},
    )
    assert reply.choices[0].finish_reason == "stop"
    document = json.loads(reply.choices[0].message.content or "")
    jsonschema.validate(document, CITY)
    assert document["city"] == "Paris"


def test_tool_round_trip(client):
    """SmolLM2 calls get_weather for the city asked; the call and its result go back in and
    it answers in text."""
    api, model = client
    ask: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = api.chat.completions.create(
        model=model,
        messages=ask,
        max_tokens=100,
        temperature=0,
        tools=[WEATHER_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
    )
    calls = first.choices[0].message.tool_calls
    assert first.choices[0].finish_reason == "tool_calls"
    assert calls is not None
    assert len(calls) == 1
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    second = api.chat.completions.create(
        model=model,
        messages=[
            *ask,
            {"role": "assistant", "content": None, "tool_calls": [calls[0].model_dump()]},
            {"role": "tool", "tool_call_id": calls[0].id, "content": '{"sky": "sunny", "c": 21}'},
        ],
        max_tokens=60,
        temperature=0,
        tools=[WEATHER_TOOL],
        tool_choice="none",  # a 135M model would gladly call again; the app wants words now
    )
    answer = second.choices[0].message
    assert answer.tool_calls is None
    assert answer.content  # what a 135M model makes of the result is not this test's concern
