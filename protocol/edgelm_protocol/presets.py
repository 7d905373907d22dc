"""Prompt presets: named prompts, output formats and sampling signed with a model. Pure.

In a factory the system prompt, the JSON schema and the sampling belong to a model version as
much as its weights do, so they travel the same way: inside the target's signed
``custom["edgelm"]["presets"]``, through the registry and through rollouts, verified like the
weights. A request selects one by name (``"preset": "extract"``); its fields then apply where
the request sets none of its own. Targets never change, so a changed preset is a new version.

The signed form, one object per preset name::

    "presets": {
      "extract": {
        "description": "Invoice fields as JSON",
        "system": "You read invoices and answer with their fields.",
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "invoice", "schema": {...}}},
        "sampling": {"temperature": "0.2", "max_tokens": 256, "stop": ["\\n\\n"]}
      },
      "assist": {"system": "...", "tools": [{"type": "function", "function": {...}}],
                 "tool_choice": "auto"}
    }

Everything here is checked before anything is signed (by ``edgelm models import``, ``edgelm
fleet models push`` and the control plane's repository) and again by every agent that reads
the metadata. This module checks the structure and the JSON Schema keywords; the agent also
runs each preset through its own request parsers (the grammar is built once), so a preset the
API would refuse is refused when the model is imported or installed, never at request time.

TUF signs canonical JSON, which has no floating-point numbers: sampling decimals are decimal
strings, as in the target's own ``sampling``, and a fractional number inside a schema or a
tool cannot be signed at all (:mod:`edgelm_protocol.preset_files` says so, naming its place).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from edgelm_protocol.errors import InvalidModelMetadata, ProtocolError, shown
from edgelm_protocol.strict_json import check_tree

#: A preset's name: what a request writes in ``preset``.
PRESET_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
PRESET_NAME_RULE = "1-64 of a-z 0-9 _ - starting with a letter or digit"
MAX_PRESETS = 64
#: All of a target's presets as compact UTF-8 JSON. The targets metadata of a whole fleet
#: is capped at a few MB (every model's entry, fetched by every device), so each model's
#: prompts are held to a fraction of it.
MAX_PRESETS_BYTES = 64 * 1024
MAX_STOP_SEQUENCES = 4  # the API's limit (OpenAI's)
MAX_TOOLS = 128  # the API's limit
TOOL_NAME_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")
TOOL_CHOICES = ("auto", "none", "required")
RESPONSE_FORMATS = ("json_object", "json_schema")
PRESET_FIELDS = ("description", "system", "response_format", "tools", "tool_choice", "sampling")
#: The largest seed the API takes, and the smallest.
SEED_RANGE = (-(2**63), 2**64 - 1)
TOP_K_MAX = 2**31 - 1

#: JSON Schema keywords the agent enforces while generating, and those that only annotate. The
#: agent's grammar builder (``edgelm_agent.generation.json_schema_grammar``) enforces exactly
#: these; they live here so provisioning and the control plane refuse a preset before signing.
SCHEMA_KEYWORDS = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "minItems",
        "maxItems",
        "enum",
        "const",
        "anyOf",
        "$ref",
        "minLength",
        "maxLength",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
    }
)
SCHEMA_ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$schema",
        "$id",
        "$comment",
        "deprecated",
        "readOnly",
        "writeOnly",
        "$defs",
        "definitions",
    }
)
_MAX_PROBLEMS_SHOWN = 10
#: A decimal string as ``repr`` writes a float: ``0.7``, ``1e-05``.
_DECIMAL_TEXT = re.compile(r"[0-9]+(\.[0-9]+)?(e[-+]?[0-9]+)?")
#: Nesting of the presets object, counted from it: a schema as deep as the agent's grammar
#: builder takes (64 subschemas), under the few levels of the preset around it.
MAX_DEPTH = 96


@dataclass(frozen=True)
class PresetSampling:
    """Sampling a preset sets: the fields of the target's signed default sampling
    (:class:`~edgelm_protocol.targets.Sampling`, signed the same way, decimals as strings) and
    the request's other sampling fields. Each is optional, not defaulted as ``Sampling``'s are:
    what a preset leaves out is the model's default still, not a value of the preset's."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def custom(self) -> dict[str, Any]:
        """The signed form: only the fields that are set, decimals as decimal strings."""
        out: dict[str, Any] = {}
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if value is not None:
                out[name] = decimal_text(value)
        for name in ("top_k", "max_tokens", "seed"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.stop:
            out["stop"] = list(self.stop)
        return out

    def request_fields(self) -> dict[str, Any]:
        """The fields as an OpenAI request writes them."""
        out: dict[str, Any] = {
            name: getattr(self, name)
            for name in ("temperature", "top_p", "top_k", "max_tokens", "seed")
            if getattr(self, name) is not None
        }
        if self.stop:
            out["stop"] = list(self.stop)
        return out


@dataclass(frozen=True)
class Preset:
    """One named preset, checked. The JSON parts are kept as signed (OpenAI's shapes)."""

    name: str
    description: str = ""
    system: str | None = None
    response_format: Mapping[str, Any] | None = None
    tools: tuple[Mapping[str, Any], ...] = ()
    tool_choice: str | Mapping[str, Any] | None = None
    sampling: PresetSampling = field(default_factory=PresetSampling)

    def custom(self) -> dict[str, Any]:
        """The signed form of this preset (without its name, which is its key)."""
        out: dict[str, Any] = {}
        if self.description:
            out["description"] = self.description
        if self.system is not None:
            out["system"] = self.system
        if self.response_format is not None:
            out["response_format"] = _plain(self.response_format)
        if self.tools:
            out["tools"] = [_plain(t) for t in self.tools]
        if self.tool_choice is not None:
            out["tool_choice"] = _plain(self.tool_choice)
        sampling = self.sampling.custom()
        if sampling:
            out["sampling"] = sampling
        return out

    def request_fields(self) -> dict[str, Any]:
        """The output and sampling fields as an OpenAI request writes them (no messages)."""
        out: dict[str, Any] = {}
        if self.response_format is not None:
            out["response_format"] = _plain(self.response_format)
        if self.tools:
            out["tools"] = [_plain(t) for t in self.tools]
        if self.tool_choice is not None:
            out["tool_choice"] = _plain(self.tool_choice)
        return {**out, **self.sampling.request_fields()}

    def summary(self) -> dict[str, Any]:
        """What ``/v1/models`` shows of it: enough for an app to pick one."""
        return {"name": self.name, "description": self.description}


def presets_custom(presets: tuple[Preset, ...]) -> dict[str, Any]:
    """The signed ``presets`` object of a target."""
    return {p.name: p.custom() for p in presets}


# ----------------------------------------------------------------------------- checking


def parse_presets(
    raw: Any,
    where: str,
    *,
    context_length: int | None = None,
    field_name: str = "edgelm.presets",
) -> tuple[Preset, ...]:
    """Check a target's ``presets`` object; raise :class:`InvalidModelMetadata` naming the
    offending place. ``where`` starts each message (``target 'models/x/1/model.gguf'``), then
    ``field_name`` and the path inside it; ``context_length``, when known, bounds each preset's
    ``max_tokens``."""
    if raw is None:
        return ()
    at = f"{where}: {field_name}"
    if not isinstance(raw, dict):
        raise InvalidModelMetadata(f"{at} must be an object of named presets, got {_kind(raw)}")
    try:
        check_tree(raw, field_name, max_depth=MAX_DEPTH)
    except ProtocolError as exc:
        raise InvalidModelMetadata(f"{where}: {exc}") from exc
    floats = list(_floats(raw, field_name))
    # Decimals are strings in signed metadata; a float here never came from a signed file.
    if floats:
        raise InvalidModelMetadata(
            f"{where}: {floats[0]} is a fractional number, which signed metadata (canonical "
            "JSON) cannot carry"
        )
    if len(raw) > MAX_PRESETS:
        raise InvalidModelMetadata(f"{at} holds {len(raw)} presets; at most {MAX_PRESETS}")
    size = len(json.dumps(raw, ensure_ascii=False, separators=(",", ":")).encode())
    if size > MAX_PRESETS_BYTES:
        raise InvalidModelMetadata(
            f"{at} is {size} bytes of JSON; at most {MAX_PRESETS_BYTES} (signed metadata is "
            "fetched by every device, so keep prompts and schemas lean)"
        )
    return tuple(_preset(name, raw[name], at, context_length) for name in sorted(raw))


def _preset(name: Any, raw: Any, presets_at: str, context_length: int | None) -> Preset:
    if not isinstance(name, str) or not PRESET_NAME_RE.fullmatch(name):
        raise InvalidModelMetadata(
            f"{presets_at}: a preset name must be {PRESET_NAME_RULE}, got {shown(name)}"
        )
    at = f"{presets_at}.{name}"
    if not isinstance(raw, dict):
        raise InvalidModelMetadata(f"{at} must be an object, got {_kind(raw)}")
    unknown = sorted(set(raw) - set(PRESET_FIELDS))
    if unknown:
        raise InvalidModelMetadata(
            f"{at} has unknown field {shown(unknown[0])}; a preset has {', '.join(PRESET_FIELDS)}"
        )
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise InvalidModelMetadata(f"{at}.description must be a string, got {_kind(description)}")
    system = raw.get("system")
    if system is not None and (not isinstance(system, str) or not system.strip()):
        raise InvalidModelMetadata(f"{at}.system must be a non-empty string, got {shown(system)}")
    response_format = _response_format(raw.get("response_format"), f"{at}.response_format")
    tools = _tools(raw.get("tools"), f"{at}.tools")
    tool_choice = _tool_choice(raw.get("tool_choice"), tools, f"{at}.tool_choice")
    if response_format is not None and tools and tool_choice != "none":
        # The API refuses a request held to a format that may also call tools.
        raise InvalidModelMetadata(
            f"{at} sets both response_format and tools; a reply held to a format cannot also "
            "call tools, so give one of them (or tool_choice 'none')"
        )
    sampling = _sampling(raw.get("sampling"), f"{at}.sampling", context_length)
    preset = Preset(
        name=name,
        description=description,
        system=system,
        response_format=response_format,
        tools=tools,
        tool_choice=tool_choice,
        sampling=sampling,
    )
    if system is None and response_format is None and not tools and sampling == PresetSampling():
        raise InvalidModelMetadata(
            f"{at} sets nothing: give it a system prompt, a response_format, tools or sampling"
        )
    return preset


def _response_format(value: Any, at: str) -> Mapping[str, Any] | None:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if not isinstance(value, dict) or kind not in RESPONSE_FORMATS:
        raise InvalidModelMetadata(
            f"{at} must be an object whose type is json_object or json_schema (leave it out "
            f"for free text), got {shown(value)}"
        )
    checked: dict[str, Any] = value
    if kind == "json_object":
        _only(checked, ("type",), at)
        return checked
    _only(checked, ("type", "json_schema"), at)
    spec = checked.get("json_schema")
    if not isinstance(spec, dict):
        raise InvalidModelMetadata(f"{at}.json_schema must be an object with a 'schema'")
    _only(spec, ("name", "description", "schema", "strict"), f"{at}.json_schema")
    for key, kinds in (("name", str), ("description", str), ("strict", bool)):
        if key in spec and not isinstance(spec[key], kinds):
            raise InvalidModelMetadata(
                f"{at}.json_schema.{key} must be a {kinds.__name__}, got {_kind(spec[key])}"
            )
    if "schema" not in spec:
        raise InvalidModelMetadata(f"{at}.json_schema has no 'schema'")
    _check_schema(spec["schema"], f"{at}.json_schema.schema")
    return checked


def _tools(value: Any, at: str) -> tuple[Mapping[str, Any], ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not value:
        raise InvalidModelMetadata(f"{at} must be a non-empty list of function tools")
    if len(value) > MAX_TOOLS:
        raise InvalidModelMetadata(f"{at} holds {len(value)} tools; at most {MAX_TOOLS}")
    names: set[str] = set()
    for i, tool in enumerate(value):
        here = f"{at}[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise InvalidModelMetadata(
                f"{here} must be an object with type 'function', got {shown(tool)}"
            )
        _only(tool, ("type", "function"), here)
        function = tool.get("function")
        if not isinstance(function, dict):
            raise InvalidModelMetadata(f"{here}.function must be an object")
        _only(function, ("name", "description", "parameters", "strict"), f"{here}.function")
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME_RE.fullmatch(name):
            raise InvalidModelMetadata(
                f"{here}.function.name must be 1-64 letters, digits, '_' or '-', got {shown(name)}"
            )
        if name in names:
            raise InvalidModelMetadata(f"{at} names the function {name!r} twice")
        names.add(name)
        if not isinstance(function.get("description", ""), str):
            raise InvalidModelMetadata(f"{here}.function.description must be a string")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise InvalidModelMetadata(
                f"{here}.function.parameters must be a JSON schema of type 'object'"
            )
        _check_schema(parameters, f"{here}.function.parameters")
    return tuple(value)


def _tool_choice(
    value: Any, tools: tuple[Mapping[str, Any], ...], at: str
) -> str | Mapping[str, Any] | None:
    if value is None:
        return None
    names = [t["function"]["name"] for t in tools]
    if value in TOOL_CHOICES:
        if value == "required" and not tools:
            raise InvalidModelMetadata(f"{at} is 'required' but the preset has no tools")
        return str(value)
    function = value.get("function") if isinstance(value, dict) else None
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(function, dict):
        name = function.get("name")
        if name not in names:
            offered = ", ".join(names) or "none"
            raise InvalidModelMetadata(
                f"{at} names the function {shown(name)}, which the preset's tools do not "
                f"offer; they offer {offered}"
            )
        return value
    raise InvalidModelMetadata(
        f"{at} must be 'auto', 'none', 'required' or "
        f'{{"type": "function", "function": {{"name": ...}}}}, got {shown(value)}'
    )


def _sampling(value: Any, at: str, context_length: int | None) -> PresetSampling:
    if value is None:
        return PresetSampling()
    if not isinstance(value, dict):
        raise InvalidModelMetadata(f"{at} must be an object, got {_kind(value)}")
    _only(value, ("temperature", "top_p", "top_k", "max_tokens", "seed", "stop"), at)
    max_tokens_limit = context_length if context_length is not None else 2**31 - 1
    stop = value.get("stop", [])
    if isinstance(stop, str):
        stop = [stop]
    if (
        not isinstance(stop, list)
        or not all(isinstance(s, str) and s for s in stop)
        or len(stop) > MAX_STOP_SEQUENCES
    ):
        raise InvalidModelMetadata(
            f"{at}.stop must be a non-empty string or a list of at most {MAX_STOP_SEQUENCES}, "
            f"got {shown(stop)}"
        )
    return PresetSampling(
        temperature=_decimal_in(value, "temperature", 0.0, 2.0, at),
        top_p=_decimal_in(value, "top_p", 0.0, 1.0, at),
        top_k=_integer_in(value, "top_k", 0, TOP_K_MAX, at),
        max_tokens=_integer_in(value, "max_tokens", 1, max_tokens_limit, at),
        seed=_integer_in(value, "seed", *SEED_RANGE, at),
        stop=tuple(stop),
    )


def _decimal_in(data: dict[str, Any], key: str, low: float, high: float, at: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    readable = (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, str) and _DECIMAL_TEXT.fullmatch(value) is not None
    )
    number = float(value) if readable else None
    if number is None or not math.isfinite(number) or not low <= number <= high:
        raise InvalidModelMetadata(
            f"{at}.{key} must be a decimal from {low:g} to {high:g} (written as a string in "
            f'signed metadata, "0.7"), got {shown(value)}'
        )
    return number


def _integer_in(data: dict[str, Any], key: str, low: int, high: int, at: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidModelMetadata(
            f"{at}.{key} must be an integer from {low} to {high}, got {shown(value)}"
        )
    return value


def _only(value: dict[str, Any], allowed: tuple[str, ...], at: str) -> None:
    """Unknown fields are refused: a typo (``temprature``) would otherwise be signed and
    silently do nothing on every device."""
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise InvalidModelMetadata(
            f"{at} has unknown field {shown(unknown[0])}; it takes {', '.join(allowed)}"
        )


def unsupported_schema_features(schema: Any) -> list[str]:
    """What in ``schema`` the agent cannot enforce while generating, each with its JSON
    pointer: keywords outside :data:`SCHEMA_KEYWORDS` and :data:`SCHEMA_ANNOTATIONS`, and
    subschemas that are not schemas. The agent's grammar builder checks the rest."""
    problems: list[str] = []
    stack: list[tuple[Any, str]] = [(schema, "")]
    while stack:
        node, pointer = stack.pop()
        where = pointer or "/"
        if isinstance(node, bool):
            continue
        if not isinstance(node, dict):
            problems.append(f"a schema must be an object or a boolean at {where}")
            continue
        for key in sorted(set(node) - SCHEMA_KEYWORDS - SCHEMA_ANNOTATIONS):
            problems.append(f"unsupported keyword {key!r} at {where}")
        for key in ("properties", "$defs", "definitions"):
            members = node.get(key)
            if members is None:
                continue
            if not isinstance(members, dict):
                problems.append(f"{key!r} must be an object at {where}")
                continue
            stack.extend((sub, f"{pointer}/{key}/{_pointer_part(k)}") for k, sub in members.items())
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                stack.append((node[key], f"{pointer}/{key}"))
        alternatives = node.get("anyOf")
        if isinstance(alternatives, list):
            stack.extend((sub, f"{pointer}/anyOf/{i}") for i, sub in enumerate(alternatives))
    return sorted(problems)


def _check_schema(schema: Any, at: str) -> None:
    if not isinstance(schema, dict | bool):
        raise InvalidModelMetadata(f"{at} must be a JSON schema object, got {_kind(schema)}")
    problems = unsupported_schema_features(schema)
    if problems:
        more = len(problems) - _MAX_PROBLEMS_SHOWN
        listed = problems[:_MAX_PROBLEMS_SHOWN] + ([f"and {more} more"] if more > 0 else [])
        raise InvalidModelMetadata(f"{at} cannot be enforced while generating: {'; '.join(listed)}")


def _pointer_part(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _floats(value: Any, path: str) -> Iterator[str]:
    if isinstance(value, float):
        yield f"{path} ({value!r})"
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _floats(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _floats(item, f"{path}[{i}]")


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _plain(value: Any) -> Any:
    """A deep copy as plain dicts and lists, so no caller can change a checked preset."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def decimal_text(value: float) -> str | int:
    return int(value) if value.is_integer() else repr(value)
