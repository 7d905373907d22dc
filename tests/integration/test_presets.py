"""Prompt presets on a real agent: signed with the tiny GGUF by `edgelm models import
--presets`, selected through the official openai client with ``extra_body={"preset": ...}``.

The tiny model has random weights: a reply that parses and validates does so because the
preset's schema held each token. Whether the preset's system prompt reached the model is read
from what the agent reports: the prompt's token count, and a greedy reply that is the same
token for token as the one to the same request written out by hand.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from tests.agent_process import REPO, TINY_GGUF, AgentProcess

INVOICE: dict[str, Any] = {
    "type": "object",
    "properties": {
        "paid": {"type": "boolean"},
        "total": {"type": "integer", "minimum": 0, "maximum": 9999},
    },
    "required": ["paid", "total"],
}
WEATHER: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 8}},
    "required": ["city"],
}
SYSTEM = "You read invoices and answer with their fields."


def toml_value(value: Any) -> str:
    """An inline TOML value: JSON with ``=`` for ``:`` is one, for these schemas."""
    return json.dumps(value).replace('": ', '" = ')


PRESETS_TOML = f"""
[extract]
description = "Invoice fields as JSON"
system = "{SYSTEM}"
sampling = {{ temperature = 0.0, max_tokens = 64 }}

[extract.response_format]
type = "json_schema"
json_schema = {{ name = "invoice", schema = {toml_value(INVOICE)} }}

[assist]
description = "Calls the weather tool"
system = "You call tools."
tool_choice = "required"
sampling = {{ max_tokens = 200 }}

[[assist.tools]]
type = "function"
function = {{ name = "get_weather", parameters = {toml_value(WEATHER)} }}

[short]
sampling = {{ max_tokens = 4, temperature = 0.0 }}
"""
USER: Any = [{"role": "user", "content": "Invoice 12, paid."}]


def edgelm(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELM_")}
    return subprocess.run(
        [sys.executable, "-m", "edgelm_cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentProcess]:
    """An agent serving tiny@1.0, imported and activated with its presets on disk first."""
    workdir = Path(tempfile.mkdtemp(prefix="edgelm-", dir="/tmp"))
    presets = workdir / "presets.toml"
    presets.write_text(PRESETS_TOML)
    state = workdir / "state"
    imported = edgelm(
        "models", "import", TINY_GGUF, "--name", "tiny", "--version", "1.0",
        "--presets", presets, "--state-dir", state, "--json",
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    activated = edgelm("models", "activate", "tiny@1.0", "--state-dir", state, "--json")
    assert activated.returncode == 0, activated.stderr
    process = AgentProcess(workdir, model=None).wait_ready()
    yield process
    process.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def client(agent: AgentProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=agent.base_url + "/v1", api_key="unused", max_retries=0)


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    assert isinstance(exc.body, dict)
    error: dict[str, Any] = exc.body.get("error", exc.body)
    return error


class TestListed:
    def test_v1_models_lists_each_preset_with_its_description(self, client):
        """An app finds the presets where it finds the model."""
        [model] = client.models.list().data
        assert model.id == "tiny"
        assert (model.model_extra or {})["presets"] == [
            {"name": "assist", "description": "Calls the weather tool"},
            {"name": "extract", "description": "Invoice fields as JSON"},
            {"name": "short", "description": ""},
        ]


class TestSelected:
    @pytest.mark.parametrize("seed", range(3))
    def test_the_presets_schema_holds_every_reply(self, client, seed):
        """Sampled replies under the preset's schema all parse and validate."""
        reply = client.chat.completions.create(
            model="tiny",
            messages=USER,
            temperature=1.0,
            seed=seed,
            extra_body={"preset": "extract"},
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "stop"
        assert choice.message.content is not None
        jsonschema.validate(json.loads(choice.message.content), INVOICE)

    def test_the_system_prompt_reaches_the_model(self, client, agent):
        """The preset is the same request written out by hand: the same prompt tokens and
        the same greedy reply; without the system prompt the prompt is shorter. The request
        log names the preset."""
        by_name = client.chat.completions.create(
            model="tiny",
            messages=USER,
            extra_body={"preset": "extract"},
            extra_headers={"X-Request-Id": "preset-by-name"},
        )
        by_hand = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "system", "content": SYSTEM}, *USER],
            temperature=0,
            max_tokens=64,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "invoice", "schema": INVOICE},
            },
        )
        without_system = client.chat.completions.create(
            model="tiny", messages=USER, temperature=0, max_tokens=64
        )
        assert by_name.usage is not None
        assert by_hand.usage is not None
        assert without_system.usage is not None
        assert by_name.usage.prompt_tokens == by_hand.usage.prompt_tokens
        assert by_name.choices[0].message.content == by_hand.choices[0].message.content
        assert without_system.usage.prompt_tokens < by_name.usage.prompt_tokens
        [logged] = [
            e
            for e in agent.log_events("request_finished")
            if e.get("request_id") == "preset-by-name"
        ]
        assert logged["preset"] == "extract"
        assert logged["max_tokens"] == 64

    def test_the_requests_own_system_message_wins(self, client):
        """A request with a system message of its own gets no second one from the preset."""
        own = [{"role": "system", "content": "Be brief."}, *USER]
        with_preset = client.chat.completions.create(
            model="tiny", messages=own, extra_body={"preset": "extract"}
        )
        without = client.chat.completions.create(
            model="tiny", messages=own, temperature=0, max_tokens=64
        )
        assert with_preset.usage is not None
        assert without.usage is not None
        assert with_preset.usage.prompt_tokens == without.usage.prompt_tokens

    def test_a_streamed_reply_is_the_same_document(self, client):
        """Streaming under a preset sends the text the whole reply has."""
        request: Any = {"model": "tiny", "messages": USER, "extra_body": {"preset": "extract"}}
        whole = client.chat.completions.create(**request).choices[0].message.content
        chunks = list(client.chat.completions.create(**request, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole
        jsonschema.validate(json.loads(text), INVOICE)

    def test_the_presets_tools_are_called(self, client):
        """A preset with tools and tool_choice required: the reply is a call whose arguments
        validate against the tool's parameters."""
        reply = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Weather in Oslo?"}],
            seed=1,
            extra_body={"preset": "assist"},
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            assert call.type == "function"
            assert call.function.name == "get_weather"
            jsonschema.validate(json.loads(call.function.arguments), WEATHER)

    def test_a_completion_takes_a_sampling_preset(self, client):
        """/v1/completions applies a preset of sampling alone: max_tokens 4."""
        reply = client.completions.create(
            model="tiny", prompt="hello", extra_body={"preset": "short"}
        )
        assert reply.usage is not None
        assert reply.usage.completion_tokens == 4
        assert reply.choices[0].finish_reason == "length"


class TestOverridden:
    def test_the_requests_own_schema_replaces_the_presets(self, client):
        """The request's response_format wins: the reply follows its schema, not the
        preset's (which requires fields the request's schema does not allow)."""
        own = {
            "type": "object",
            "properties": {"ok": {"type": "boolean"}},
            "required": ["ok"],
            "additionalProperties": False,
        }
        reply = client.chat.completions.create(
            model="tiny",
            messages=USER,
            response_format={"type": "json_schema", "json_schema": {"name": "ok", "schema": own}},
            extra_body={"preset": "extract"},
        )
        document = json.loads(reply.choices[0].message.content or "")
        jsonschema.validate(document, own)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(document, INVOICE)

    def test_the_requests_max_tokens_replaces_the_presets(self, client):
        """max_tokens 3 from the request, not 64 from the preset: the reply is cut there."""
        reply = client.chat.completions.create(
            model="tiny", messages=USER, max_tokens=3, extra_body={"preset": "extract"}
        )
        assert reply.usage is not None
        assert reply.usage.completion_tokens == 3
        assert reply.choices[0].finish_reason == "length"


class TestRefused:
    def test_an_unknown_preset_names_the_ones_there_are(self, client):
        """400 preset_not_found, param preset, listing the model's presets."""
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model="tiny", messages=USER, extra_body={"preset": "extrakt"}
            )
        error = error_of(caught.value)
        assert (error["code"], error["param"]) == ("preset_not_found", "preset")
        assert error["message"] == (
            "model 'tiny' has no preset 'extrakt'; it has assist, extract, short"
        )

    def test_a_completion_refuses_a_preset_with_a_system_prompt(self, client):
        """A completion has no messages to put a system prompt in: a clear 400."""
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(
                model="tiny", prompt="hello", extra_body={"preset": "extract"}
            )
        assert "only a chat takes" in error_of(caught.value)["message"]


class TestJobs:
    def test_a_job_selects_a_preset_too(self, agent):
        """A durable job names the preset in its request; its result follows the schema."""
        status, job = agent.request(
            "POST",
            "/v1/jobs",
            {"request": {"model": "tiny", "messages": USER, "preset": "extract", "seed": 4}},
        )
        assert status == 202, job
        deadline = time.monotonic() + 120
        while job["state"] not in ("succeeded", "failed", "dead", "cancelled", "expired"):
            assert time.monotonic() < deadline, job
            time.sleep(0.1)
            status, job = agent.request("GET", f"/v1/jobs/{job['id']}")
        assert job["state"] == "succeeded", job
        content = job["result"]["choices"][0]["message"]["content"]
        jsonschema.validate(json.loads(content), INVOICE)

    def test_a_job_naming_a_missing_preset_fails_without_retries(self, agent):
        """The request is wrong, not the moment: the job fails once, with the same error."""
        status, job = agent.request(
            "POST",
            "/v1/jobs",
            {"request": {"model": "tiny", "messages": USER, "preset": "nope"}},
        )
        assert status == 202, job
        deadline = time.monotonic() + 120
        while job["state"] not in ("succeeded", "failed", "dead"):
            assert time.monotonic() < deadline, job
            time.sleep(0.1)
            status, job = agent.request("GET", f"/v1/jobs/{job['id']}")
        assert job["state"] == "failed", job
        assert job["error"]["code"] == "preset_not_found"
