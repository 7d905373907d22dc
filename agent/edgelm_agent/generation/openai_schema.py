"""Parse and validate OpenAI-style request bodies into plain value objects. Pure: no I/O.

Unknown fields are ignored, as OpenAI clients send many we do not use (``user``,
``logit_bias``...). Fields we cannot honour in a way the client would expect (``n > 1``) are
refused with a 400 that names the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from edgelm_agent.errors import InvalidRequest, shown
from edgelm_agent.generation.presets import preset_name
from edgelm_agent.generation.structured_output import parse_output_constraint
from edgelm_agent.generation.tool_calls import (
    ToolRequest,
    parse_tool_call,
    parse_tool_request,
    tool_constraint,
)
from edgelm_agent.inference.chat_template import ChatMessage
from edgelm_agent.inference.types import MAX_CONTEXT_LENGTH, OutputConstraint, SamplingFields
from edgelm_agent.valid_unicode import first_invalid_text

MAX_STOP_SEQUENCES = 4  # OpenAI's limit; a kiosk app needs no more
ROLES = ("system", "user", "assistant", "tool", "developer")


@dataclass(frozen=True)
class CompletionBody:
    model: str
    prompt: str
    stream: bool
    include_usage: bool
    sampling: SamplingFields
    #: What the reply must match (response_format or grammar); None for free text.
    constraint: OutputConstraint | None = None
    #: The model's prompt preset the request selects (see generation/presets.py).
    preset: str | None = None


@dataclass(frozen=True)
class ChatBody:
    model: str
    messages: tuple[ChatMessage, ...]
    stream: bool
    include_usage: bool
    sampling: SamplingFields
    #: What the reply must match: response_format or grammar, or the grammar of the calls to
    #: the tools it offers (never both).
    constraint: OutputConstraint | None = None
    tools: ToolRequest | None = None
    preset: str | None = None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def decode_json_object(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError as exc:  # absurdly deep nesting; json raises rather than parses
        raise InvalidRequest("request body is nested too deeply") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, over-long integers
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidRequest(f"request body must be a JSON object, got {type(data).__name__}")
    invalid = first_invalid_text(data)
    if invalid is not None:
        raise InvalidRequest(invalid.message, param=invalid.param)
    return data


def model_field(data: dict[str, Any]) -> str:
    """The request's ``model``, checked."""
    return _required_str(data, "model")


def _required_str(data: dict[str, Any], name: str) -> str:
    if name not in data:
        raise InvalidRequest(f"missing required field {name!r}", param=name)
    value = data[name]
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{name!r} must be a non-empty string", param=name)
    return value


def finite_number(value: Any) -> float | None:
    """``value`` as a float if it is a JSON number a float can hold; ``None`` otherwise (a
    string, a bool, NaN, or an integer of hundreds of digits, which ``float()`` and
    ``math.isfinite`` refuse with OverflowError)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _number(data: dict[str, Any], name: str, lo: float, hi: float) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    number = finite_number(value)
    if number is None:
        raise InvalidRequest(
            f"{name!r} must be a number between {lo} and {hi}, got {shown(value)}", param=name
        )
    if not lo <= number <= hi:
        raise InvalidRequest(
            f"{name!r} must be between {lo} and {hi}, got {shown(value)}", param=name
        )
    return number


def _integer(data: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name!r} must be an integer, got {shown(value)}", param=name)
    if not lo <= value <= hi:
        raise InvalidRequest(
            f"{name!r} must be between {lo} and {hi}, got {shown(value)}", param=name
        )
    return value


def _stop(data: dict[str, Any]) -> tuple[str, ...]:
    value = data.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise InvalidRequest("'stop' must be a string or a list of strings", param="stop")
    if len(value) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(
            f"'stop' takes at most {MAX_STOP_SEQUENCES} strings, got {len(value)}", param="stop"
        )
    return tuple(s for s in value if s)


# Fields we cannot honour as a client would expect, with the values that ask for nothing.
# Refusing anything else beats silently ignoring it.
UNSUPPORTED: dict[str, tuple[str, tuple[Any, ...]]] = {
    "functions": ("function calling", (None, [])),
    "function_call": ("function calling", (None, "none")),
    "logprobs": ("log probabilities", (None, False)),
    "top_logprobs": ("log probabilities", (None, 0)),
    "echo": ("echo", (None, False)),
    "suffix": ("suffix insertion", (None, "")),
    "best_of": ("best_of", (None, 1)),
}


def _refuse_unsupported(data: dict[str, Any]) -> None:
    for name, (feature, neutral) in UNSUPPORTED.items():
        value = data.get(name)
        if not any(value is n or (type(value) is type(n) and value == n) for n in neutral):
            raise InvalidRequest(f"{feature} ({name!r}) is not supported by this agent", param=name)


def _sampling(data: dict[str, Any]) -> SamplingFields:
    _refuse_unsupported(data)
    n = _integer(data, "n", 1, 2**63)
    if n is not None and n != 1:
        raise InvalidRequest("only 'n' = 1 is supported", param="n")
    # No reply is longer than the largest context the agent serves.
    # Both are checked, though max_completion_tokens wins: a bad field is never ignored.
    legacy_max_tokens = _integer(data, "max_tokens", 1, MAX_CONTEXT_LENGTH)
    max_tokens = _integer(data, "max_completion_tokens", 1, MAX_CONTEXT_LENGTH)
    if max_tokens is None:
        max_tokens = legacy_max_tokens
    return SamplingFields(
        max_tokens=max_tokens,
        temperature=_number(data, "temperature", 0.0, 2.0),
        top_p=_number(data, "top_p", 0.0, 1.0),
        top_k=_integer(data, "top_k", 0, 2**31 - 1),
        seed=_integer(data, "seed", -(2**63), 2**64 - 1),
        stop=_stop(data),
    )


def _stream_flags(data: dict[str, Any]) -> tuple[bool, bool]:
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be true or false", param="stream")
    options = data.get("stream_options")
    if options is None:  # only null means none: false, 0 or [] are not objects
        options = {}
    if not isinstance(options, dict):
        raise InvalidRequest("'stream_options' must be an object", param="stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise InvalidRequest(
            "'stream_options.include_usage' must be true or false", param="stream_options"
        )
    return stream, include_usage


def _message_content(value: Any, index: int) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise InvalidRequest(
                    f"messages[{index}].content: only text parts are supported",
                    param=f"messages[{index}].content",
                )
            parts.append(part["text"])
        return "".join(parts)
    raise InvalidRequest(
        f"messages[{index}].content must be a string or a list of text parts",
        param=f"messages[{index}].content",
    )


def _messages(data: dict[str, Any]) -> tuple[ChatMessage, ...]:
    if "messages" not in data:
        raise InvalidRequest("missing required field 'messages'", param="messages")
    raw = data["messages"]
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest("'messages' must be a non-empty list", param="messages")
    messages = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise InvalidRequest(f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = item.get("role")
        if role not in ROLES:
            raise InvalidRequest(
                f"messages[{i}].role must be one of {', '.join(ROLES)}, got {shown(role)}",
                param=f"messages[{i}].role",
            )
        # OpenAI's newer "developer" role is its "system" role; model templates know the latter.
        messages.append(
            ChatMessage(
                role="system" if role == "developer" else role,
                content=_message_content(item.get("content"), i),
                tool_calls=_tool_calls(item, i) if role == "assistant" else (),
                tool_call_id=_tool_call_id(item, i) if role == "tool" else None,
            )
        )
    return tuple(messages)


def _tool_calls(item: dict[str, Any], index: int) -> tuple[Any, ...]:
    calls = item.get("tool_calls")
    if calls is None:
        return ()
    param = f"messages[{index}].tool_calls"
    if not isinstance(calls, list):
        raise InvalidRequest(f"{param} must be a list", param=param)
    return tuple(parse_tool_call(call, f"{param}[{n}]") for n, call in enumerate(calls))


def _tool_call_id(item: dict[str, Any], index: int) -> str | None:
    value = item.get("tool_call_id")
    if value is not None and not isinstance(value, str):
        param = f"messages[{index}].tool_call_id"
        raise InvalidRequest(f"{param} must be a string", param=param)
    return value


def parse_chat(data: dict[str, Any]) -> ChatBody:
    stream, include_usage = _stream_flags(data)
    messages = _messages(data)
    preset = preset_name(data)
    if preset is not None and data.get("tools") is None:
        # tool_choice may choose among the preset's tools, which only prepare() knows: the
        # body with the preset written in is parsed again, tool_choice checked there.
        data = {k: v for k, v in data.items() if k != "tool_choice"}
    tools = parse_tool_request(data)
    constraint = parse_output_constraint(data)
    if tools is not None and tools.offered:
        if constraint is not None:
            raise InvalidRequest(
                "a reply held to response_format or grammar cannot also call tools; set "
                "'tool_choice' to 'none' or leave one out",
                param="response_format" if constraint.kind != "grammar" else "grammar",
            )
        # The calls' grammar is built here, from the tools' parameter schemas, so a schema it
        # cannot enforce is refused when a job is submitted, not when it runs.
        constraint = tool_constraint(tools)
    return ChatBody(
        model=_required_str(data, "model"),
        messages=messages,
        stream=stream,
        include_usage=include_usage,
        sampling=_sampling(data),
        constraint=constraint,
        tools=tools,
        preset=preset,
    )


def parse_completion(data: dict[str, Any]) -> CompletionBody:
    stream, include_usage = _stream_flags(data)
    if "prompt" not in data:
        raise InvalidRequest("missing required field 'prompt'", param="prompt")
    prompt = data["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # the openai client may wrap a single prompt in a list
    if not isinstance(prompt, str):
        raise InvalidRequest("'prompt' must be a string", param="prompt")
    if not prompt:
        # Refused here, for every model alike: one that adds a BOS token would otherwise
        # generate from nothing while one that does not refuses the empty prompt.
        raise InvalidRequest("'prompt' must not be empty", param="prompt")
    for name in ("tools", "tool_choice"):
        if data.get(name) not in (None, [], "none"):
            raise InvalidRequest(
                f"{name!r} belongs to /v1/chat/completions; a completion cannot call tools",
                param=name,
            )
    return CompletionBody(
        model=_required_str(data, "model"),
        prompt=prompt,
        stream=stream,
        include_usage=include_usage,
        sampling=_sampling(data),
        constraint=parse_output_constraint(data),
        preset=preset_name(data),
    )
