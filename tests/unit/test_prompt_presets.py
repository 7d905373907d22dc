"""Prompt presets at request time, and the agent's own check of a preset before it installs.

prepare() runs on a fake backend whose tokens are the prompt's characters, so a test reads
the rendered prompt back from the tokens.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgelm_agent.errors import InvalidRequest
from edgelm_agent.generation.json_schema_grammar import UnsupportedSchema, schema_gbnf
from edgelm_agent.generation.openai_schema import parse_chat
from edgelm_agent.generation.prepare import prepare
from edgelm_agent.generation.presets import PresetNotFound, apply_preset, preset_name
from edgelm_agent.inference.scheduler import Scheduler
from edgelm_agent.inference.types import OutputConstraint
from edgelm_agent.registry.errors import InvalidModelMetadata
from edgelm_agent.registry.model_target import check_presets, parse_model_target
from edgelm_agent.serving import ModelHost, ServingModel
from edgelm_protocol.presets import SCHEMA_ANNOTATIONS, SCHEMA_KEYWORDS, Preset, PresetSampling
from tests.fake_backend import FakeBackend

TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}<|assistant|>"
INVOICE: dict[str, Any] = {
    "type": "object",
    "properties": {"total": {"type": "integer"}},
    "required": ["total"],
}
INVOICE_FORMAT = {"type": "json_schema", "json_schema": {"name": "inv", "schema": INVOICE}}
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
EXTRACT = Preset(
    name="extract",
    description="Invoice fields",
    system="You read invoices.",
    response_format=INVOICE_FORMAT,
    sampling=PresetSampling(temperature=0.2, top_p=0.5, top_k=7, max_tokens=99, seed=5),
)
ASSIST = Preset(name="assist", system="You call tools.", tools=(WEATHER_TOOL,))
LOOKUP = Preset(name="lookup", tools=(WEATHER_TOOL,))
STOPS = Preset(name="stops", sampling=PresetSampling(stop=("END",)))
USER = {"role": "user", "content": "Invoice 12"}


class ConstrainingBackend(FakeBackend):
    """The fake backend, able to hold a reply to a format (it only records it)."""

    def check_constraint(self, constraint: OutputConstraint) -> None:
        return None


@pytest.fixture
async def host() -> ModelHost:
    backend = ConstrainingBackend()
    model = ServingModel(
        backend,
        Scheduler(backend, max_queue=1, retry_after_s=1),
        context_length=4096,
        chat_template=TEMPLATE,
        presets=(ASSIST, EXTRACT, LOOKUP, STOPS),
    )
    host = ModelHost()
    host.set_active(model)
    return host


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "fake", "messages": [USER], **fields}


def prompt_of(tokens: list[int]) -> str:
    return "".join(chr(t) for t in tokens)


class TestPrepare:
    async def test_the_system_prompt_and_the_schema_apply(self, host: ModelHost) -> None:
        """A chat naming a preset gets its system message first, its schema and its sampling."""
        prepared = await prepare(chat(preset="extract"), host, "chat")
        assert prompt_of(prepared.tokens) == (
            "<|system|>You read invoices.\n<|user|>Invoice 12\n<|assistant|>"
        )
        params = prepared.params
        assert params.constraint is not None
        assert params.constraint.kind == "json_schema"
        assert "inv" in params.constraint.description
        assert (params.temperature, params.top_p, params.top_k) == (0.2, 0.5, 7)
        assert (params.max_tokens, params.seed) == (99, 5)
        assert prepared.preset == "extract"

    async def test_a_preset_means_what_its_fields_sent_by_the_client_mean(
        self, host: ModelHost
    ) -> None:
        """The same request written out by hand prepares to the same tokens and parameters."""
        by_name = await prepare(chat(preset="extract"), host, "chat")
        by_hand = await prepare(
            {
                "model": "fake",
                "messages": [{"role": "system", "content": "You read invoices."}, USER],
                "response_format": INVOICE_FORMAT,
                "temperature": 0.2,
                "top_p": 0.5,
                "top_k": 7,
                "max_tokens": 99,
                "seed": 5,
            },
            host,
            "chat",
        )
        assert by_name.tokens == by_hand.tokens
        assert by_name.params == by_hand.params

    async def test_the_requests_system_message_wins(self, host: ModelHost) -> None:
        """A request with its own system (or developer) message keeps it, alone."""
        for role in ("system", "developer"):
            own = [{"role": role, "content": "Be brief."}, USER]
            prepared = await prepare(chat(preset="extract", messages=own), host, "chat")
            text = prompt_of(prepared.tokens)
            assert text.startswith("<|system|>Be brief.\n")
            assert "invoices" not in text

    async def test_a_requests_output_replaces_the_presets(self, host: ModelHost) -> None:
        """response_format text asks for free text under a preset with a schema; the request's
        own schema replaces the preset's; the preset's sampling still applies."""
        free = await prepare(chat(preset="extract", response_format={"type": "text"}), host, "chat")
        assert free.params.constraint is None
        assert free.params.temperature == 0.2
        other = {"type": "json_object"}
        own = await prepare(chat(preset="extract", response_format=other), host, "chat")
        assert own.params.constraint is not None
        assert own.params.constraint.kind == "json_object"

    async def test_a_requests_tools_replace_the_presets_schema(self, host: ModelHost) -> None:
        """Tools in the request replace the preset's response_format, so the two never clash."""
        prepared = await prepare(chat(preset="extract", tools=[WEATHER_TOOL]), host, "chat")
        assert prepared.params.constraint is not None
        assert prepared.params.constraint.kind == "tool_calls"

    async def test_tool_choice_alone_picks_among_the_presets_tools(self, host: ModelHost) -> None:
        """A request may name one of the preset's tools, or none, without sending tools."""
        choice = {"type": "function", "function": {"name": "get_weather"}}
        named = await prepare(chat(preset="assist", tool_choice=choice), host, "chat")
        assert named.params.constraint is not None
        assert "get_weather" in named.params.constraint.description
        assert "get_weather" in prompt_of(named.tokens)  # described to a template without tools
        none = await prepare(chat(preset="assist", tool_choice="none"), host, "chat")
        assert none.params.constraint is None

    async def test_an_unknown_preset_names_the_ones_there_are(self, host: ModelHost) -> None:
        """404-like, as a 400 naming the field and listing the model's presets."""
        with pytest.raises(PresetNotFound) as caught:
            await prepare(chat(preset="nope"), host, "chat")
        assert str(caught.value) == (
            "model 'fake' has no preset 'nope'; it has assist, extract, lookup, stops"
        )
        assert (caught.value.param, caught.value.code) == ("preset", "preset_not_found")
        assert caught.value.available == ("assist", "extract", "lookup", "stops")

    async def test_a_completion_takes_a_preset_without_system_prompt_or_tools(
        self, host: ModelHost
    ) -> None:
        """A completion has no messages: a preset with a system prompt or tools is refused,
        one with sampling alone applies."""
        body = {"model": "fake", "prompt": "hello"}
        for name, part in (("extract", "a system prompt"), ("lookup", "tools")):
            with pytest.raises(InvalidRequest, match=f"has {part}, which only a chat takes"):
                await prepare({**body, "preset": name}, host, "completion")
        prepared = await prepare({**body, "preset": "stops"}, host, "completion")
        assert prepared.params.stop == ("END",)
        assert prompt_of(prepared.tokens) == "hello"

    async def test_without_a_preset_nothing_changes(self, host: ModelHost) -> None:
        """A request naming no preset prepares as it always did."""
        prepared = await prepare(chat(), host, "chat")
        assert prompt_of(prepared.tokens) == "<|user|>Invoice 12\n<|assistant|>"
        assert prepared.params.constraint is None
        assert prepared.preset is None


SAMPLING = {"temperature": 1.5, "top_p": 0.9, "top_k": 3, "seed": 11, "max_tokens": 12}


class TestApplyPreset:
    @given(st.sets(st.sampled_from(sorted(SAMPLING))), st.booleans())
    def test_the_request_wins_each_sampling_field_it_sets(
        self, own: set[str], completion_tokens: bool
    ) -> None:
        """Each field the request sets is the request's; each it leaves out, the preset's.
        max_completion_tokens counts as setting max_tokens."""
        fields = {k: SAMPLING[k] for k in own}
        if completion_tokens and "max_tokens" in fields:
            fields["max_completion_tokens"] = fields.pop("max_tokens")
        merged = parse_chat(apply_preset(chat(**fields), EXTRACT, "chat")).sampling
        preset = EXTRACT.sampling
        assert merged.temperature == (1.5 if "temperature" in own else preset.temperature)
        assert merged.top_p == (0.9 if "top_p" in own else preset.top_p)
        assert merged.top_k == (3 if "top_k" in own else preset.top_k)
        assert merged.seed == (11 if "seed" in own else preset.seed)
        assert merged.max_tokens == (12 if "max_tokens" in own else preset.max_tokens)

    def test_the_requests_stop_strings_replace_the_presets(self) -> None:
        """stop is one field: the request's list, or else the preset's."""
        assert apply_preset(chat(stop=["x"]), STOPS, "chat")["stop"] == ["x"]
        assert apply_preset(chat(stop=[]), STOPS, "chat")["stop"] == ["END"]

    def test_the_body_it_was_given_is_left_as_it_was(self) -> None:
        """The merged body is a new one: a stored job's request is not rewritten."""
        body = chat(preset="extract")
        before = {k: (list(v) if isinstance(v, list) else v) for k, v in body.items()}
        apply_preset(body, EXTRACT, "chat")
        assert body == before


class TestPresetField:
    @pytest.mark.parametrize("value", [3, "", "Extract", "a b", "x" * 65, ["extract"]])
    def test_a_bad_preset_field_is_a_400_naming_it(self, value: Any) -> None:
        """The field takes a preset name; anything else says what it takes."""
        with pytest.raises(InvalidRequest, match="'preset' must be a preset name") as caught:
            preset_name({"preset": value})
        assert caught.value.param == "preset"

    def test_a_job_with_tool_choice_for_the_presets_tools_passes_the_door(self) -> None:
        """At submission the model is not known yet: tool_choice waits for the preset's tools
        (it is checked when the job runs, with them written in)."""
        body = chat(preset="assist", tool_choice="required")
        assert parse_chat(body).preset == "assist"
        with pytest.raises(InvalidRequest, match="has no 'tools'"):
            parse_chat(chat(tool_choice="required"))


def custom(presets: dict[str, Any]) -> dict[str, Any]:
    return {
        "edgelm": {
            "name": "tiny",
            "version": "1.0",
            "format": "gguf",
            "backend": "llama.cpp",
            "context_length": 512,
            "chat_template": None,
            "quantization": "F32",
            "min_ram_bytes": 1,
            "sampling": {},
            "health_check": {},
            "presets": presets,
        }
    }


class TestCheckedBeforeInstall:
    @pytest.mark.parametrize("keyword", ["pattern", "format", "patternProperties", "not"])
    def test_a_keyword_the_protocol_does_not_list_the_grammar_builder_refuses(
        self, keyword: str
    ) -> None:
        """What provisioning and the control plane refuse is what the agent cannot enforce."""
        assert keyword not in SCHEMA_KEYWORDS | SCHEMA_ANNOTATIONS
        schema = {"type": "object", "properties": {"a": {"type": "string", keyword: "x"}}}
        with pytest.raises(UnsupportedSchema, match=keyword):
            schema_gbnf(schema)

    def test_a_schema_the_api_would_refuse_is_refused_at_install(self) -> None:
        """Bounds on a number pass the keyword check, but the grammar cannot hold them: the
        agent refuses the target, naming the preset, before anything is installed."""
        schema = {"type": "object", "properties": {"x": {"type": "number", "minimum": 1}}}
        fmt = {"type": "json_schema", "json_schema": {"schema": schema}}
        with pytest.raises(InvalidModelMetadata) as caught:
            parse_model_target(
                "models/tiny/1.0/model.gguf",
                10,
                {"sha256": "ab" * 32},
                custom({"p1": {"response_format": fmt}}),
            )
        message = str(caught.value)
        assert "preset 'p1' would be refused by the API" in message
        assert "'minimum' on a number" in message

    def test_a_tool_the_api_would_refuse_is_refused_at_import(self) -> None:
        """A tool's parameters go through the tool grammar, whatever tool_choice says."""
        tool = {
            "type": "function",
            "function": {
                "name": "f",
                "parameters": {"type": "object", "properties": {"n": {"$ref": "#/nowhere"}}},
            },
        }
        with pytest.raises(InvalidModelMetadata, match=r"preset 'p1'.*points at nothing"):
            check_presets({"p1": {"tools": [tool], "tool_choice": "none"}}, context_length=512)

    def test_good_presets_pass(self) -> None:
        """Presets the API accepts import as they are."""
        checked = check_presets(
            {"extract": {"response_format": INVOICE_FORMAT}, "assist": {"tools": [WEATHER_TOOL]}},
            context_length=512,
        )
        assert [p.name for p in checked] == ["assist", "extract"]
