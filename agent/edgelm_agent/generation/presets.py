"""Prompt presets at request time: a request that names one gets its fields. Pure: no I/O.

A preset (see :mod:`edgelm_protocol.presets`) is signed with the model; a request selects it
with the extension field ``"preset": "extract"``. Applying it means writing its fields into the
request body where the request sets none of its own, and then parsing the body as any other:
a preset means exactly what the same fields sent by the client would mean. The rules:

* **system**: goes first as a system message, unless the request has a system (or developer)
  message of its own, which then wins. Only a chat has messages: a completion refuses a preset
  with a system prompt rather than drop it.
* **response_format, tools and tool_choice**: apply unless the request sets ``response_format``,
  ``grammar`` or ``tools`` itself; then the request's output alone counts (``{"type": "text"}``
  asks for free text under a preset that has a schema). A request may set ``tool_choice`` alone
  to choose among the preset's tools.
* **sampling**: fills each field the request leaves unset (``max_tokens`` or
  ``max_completion_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``).

The same parsers also check every preset when its model is imported or installed
(:func:`check_preset`), so a preset the API would refuse never reaches a device's requests.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any, Literal

from edgelm_agent.errors import InvalidRequest, shown
from edgelm_agent.generation.structured_output import parse_output_constraint
from edgelm_agent.generation.tool_calls import parse_tool_request, tool_constraint
from edgelm_protocol.presets import PRESET_NAME_RE, PRESET_NAME_RULE, Preset

PARAM = "preset"
#: The request fields that say what the reply is; one of them set by the request replaces
#: the whole of the preset's output.
OUTPUT_FIELDS = ("response_format", "grammar", "tools")
SYSTEM_ROLES = ("system", "developer")


class PresetNotFound(InvalidRequest):
    """The request names a preset its model does not have; ``available`` lists those it has."""

    code = "preset_not_found"

    def __init__(self, requested: str, model_id: str, available: Sequence[str]) -> None:
        has = f"it has {', '.join(available)}" if available else "it has none"
        super().__init__(f"model {model_id!r} has no preset {requested!r}; {has}", param=PARAM)
        self.requested = requested
        self.model_id = model_id
        self.available = tuple(available)


def preset_name(data: dict[str, Any]) -> str | None:
    """The request's ``preset`` field, checked; None when it names none."""
    value = data.get(PARAM)
    if value is None:
        return None
    if not isinstance(value, str) or not re.fullmatch(PRESET_NAME_RE, value):
        raise InvalidRequest(
            f"'preset' must be a preset name ({PRESET_NAME_RULE}), got {shown(value)}",
            param=PARAM,
        )
    return value


def find_preset(presets: Sequence[Preset], name: str, model_id: str) -> Preset:
    for preset in presets:
        if preset.name == name:
            return preset
    raise PresetNotFound(name, model_id, [p.name for p in presets])


def apply_preset(
    body: dict[str, Any], preset: Preset, kind: Literal["chat", "completion"]
) -> dict[str, Any]:
    """``body`` with ``preset``'s fields written in where the request sets none (see the
    module docstring); the caller parses the result as it would any request."""
    # The preset is written in, so the result is parsed as a request that names none: its
    # tool_choice is checked against the tools it now has (parse_chat lets a request that
    # names a preset and no tools leave tool_choice for the preset's tools).
    merged = {k: v for k, v in body.items() if k != PARAM}
    if kind == "completion":
        for part, present in (("a system prompt", preset.system), ("tools", preset.tools)):
            if present:
                raise InvalidRequest(
                    f"preset {preset.name!r} has {part}, which only a chat takes; use "
                    "/v1/chat/completions, or a preset without one",
                    param=PARAM,
                )
    elif preset.system is not None:
        messages = body.get("messages")
        if isinstance(messages, list) and not any(
            isinstance(m, dict) and m.get("role") in SYSTEM_ROLES for m in messages
        ):
            merged["messages"] = [{"role": "system", "content": preset.system}, *messages]
    fields = preset.request_fields()
    if not any(body.get(name) is not None for name in OUTPUT_FIELDS):
        for name in ("response_format", "tools"):
            if name in fields:
                merged[name] = fields[name]
        if body.get("tool_choice") is None and "tool_choice" in fields:
            merged["tool_choice"] = fields["tool_choice"]
    for name, value in preset.sampling.request_fields().items():
        if name == "max_tokens":
            unset = body.get("max_tokens") is None and body.get("max_completion_tokens") is None
        elif name == "stop":
            unset = body.get("stop") in (None, "", [])
        else:
            unset = body.get(name) is None
        if unset:
            merged[name] = value
    return merged


def check_preset(preset: Preset) -> None:
    """Run ``preset``'s output fields through the API's own parsers, grammar included; raise
    the :class:`InvalidRequest` a client sending them would get."""
    fields = preset.request_fields()
    parse_output_constraint(fields)
    tools = parse_tool_request(fields)
    if tools is not None:
        # Every tool's grammar, whichever tool_choice the preset or a request picks.
        tool_constraint(dataclasses.replace(tools, mode="required", function=None))
