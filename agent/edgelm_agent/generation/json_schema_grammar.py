"""JSON Schema to a GBNF grammar, and to the schema llguidance takes. Pure: no I/O.

The grammar is what llama.cpp samples under: every token is picked among those that keep the
output a prefix of a document the schema accepts, so the output is valid when it ends, not
checked afterwards. Which features are enforced is one list, :data:`KEYWORDS`; anything else
that is not an annotation is refused with every place that uses it named, because a keyword
ignored here would be a promise broken silently.

Layout is fixed, as ``json.dumps`` writes it (``", "`` and ``": "``, no other whitespace, and
properties in the schema's order): a random-weight test model cannot waste its tokens on
spaces, a real one writes what it was trained on, and both runtimes write the same bytes.
"""

from __future__ import annotations

import copy
import functools
import json
import math
from collections.abc import Iterator
from typing import Any

from edgelm_agent.errors import InvalidRequest
from edgelm_agent.generation.gbnf import RuleSet, literal
from edgelm_agent.generation.gbnf_check import MAX_REPEAT, grammar_problem
from edgelm_protocol.presets import SCHEMA_ANNOTATIONS, SCHEMA_KEYWORDS

#: The keywords whose meaning the grammar enforces, and those that only annotate: part of the
#: signed-preset contract, so the protocol package holds them for provisioning and the control
#: plane to check presets against before signing.
KEYWORDS = SCHEMA_KEYWORDS
ANNOTATIONS = SCHEMA_ANNOTATIONS
TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")
MAX_DEPTH = 64  # nesting of subschemas; deeper is an attack on the stack, not a document
#: Nesting of any value in a schema, annotations ("default", "examples") included: deeper
#: values would overflow the stack of every recursive walk over the schema (deepcopy, json).
MAX_VALUE_DEPTH = 160
#: Largest minLength/maxLength/minItems/maxItems: llama.cpp reads a larger repetition bound
#: as no bound at all, so the grammar would not hold it.
MAX_BOUND = MAX_REPEAT
INTEGER_DIGITS = 16  # an integer without bounds has at most this many digits
_INTEGER_LIMIT = 10**INTEGER_DIGITS - 1

# Rules every grammar may use. A JSON string's character: a Unicode character other than a
# quote, a backslash or a control character, or an escape; \u escapes of surrogates are left
# out, so each character of the grammar is one character of the decoded string (minLength
# holds). The class is positive on purpose: llama.cpp decodes byte tokens into code points
# without checking them, so a negated class would also let through surrogates (ED A0 80) and
# values above U+10FFFF (F4 90 80 80 and up), which decode to several U+FFFD each.
_PRIMITIVES = {
    "char": r'[ -!#-\[\]-~\x80-\uD7FF\uE000-\U0010FFFF] | "\\" (["\\/bfnrt] | "u" '
    r"([0-9a-cA-CeEfF] [0-9a-fA-F]{3} | [dD] [0-7] [0-9a-fA-F]{2}))",
    "string": r'"\"" char* "\""',
    "integer": r'"-"? ("0" | [1-9] [0-9]{0,' + str(INTEGER_DIGITS - 1) + "})",
    "number": r'integer ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,2})?',
    "boolean": r'"true" | "false"',
    "null": r'"null"',
    "value": "object | array | string | number | boolean | null",
    "object": r'"{" (string ": " value (", " string ": " value)*)? "}"',
    "array": r'"[" (value (", " value)*)? "]"',
}
_NEEDS = {
    "string": ("char",),
    "number": ("integer",),
    "value": ("object", "array", "string", "number", "boolean", "null"),
    "object": ("string", "value"),
    "array": ("value",),
}


class UnsupportedSchema(InvalidRequest):
    """The schema uses features the grammar cannot enforce; ``features`` names each, with the
    JSON pointer of where it is used."""

    code = "unsupported_schema"

    def __init__(self, problems: list[str], *, param: str) -> None:
        shown = problems[:10] + ([f"and {len(problems) - 10} more"] if len(problems) > 10 else [])
        super().__init__(
            f"{param} cannot be enforced while generating: " + "; ".join(shown), param=param
        )
        self.features = tuple(problems)


def schema_gbnf(schema: Any, *, param: str = "json_schema") -> str:
    """The GBNF grammar of the documents ``schema`` accepts; raises :class:`UnsupportedSchema`."""
    rules = RuleSet()
    return checked_grammar(rules.text(schema_rule(rules, schema, param=param)), param=param)


def schema_rule(rules: RuleSet, schema: Any, *, param: str, hint: str = "") -> str:
    """Add the rules of ``schema`` to ``rules``; returns the expression of its documents."""
    too_deep = _too_deep(schema)
    if too_deep is not None:
        raise UnsupportedSchema([too_deep], param=param)
    converter = _Converter(schema, param, rules, hint)
    expression = converter.visit(schema, "", 0)
    if converter.problems:
        raise UnsupportedSchema(list(dict.fromkeys(converter.problems)), param=param)
    return expression


def checked_grammar(gbnf: str, *, param: str) -> str:
    """``gbnf``, built from schemas, once :mod:`.gbnf_check` finds it safe for llama.cpp; a
    schema can ask for a grammar too large or too branchy to run (``anyOf`` over ``$ref``s
    that fan out), and that is the schema's fault, said as such."""
    problem = grammar_problem(gbnf, unused_rules=True)
    if problem is not None:
        raise UnsupportedSchema([f"the grammar built from it {problem}"], param=param)
    return gbnf


def _too_deep(schema: Any) -> str | None:
    """Where ``schema`` nests a value deeper than :data:`MAX_VALUE_DEPTH`, annotations
    included; found without recursion, so the check itself cannot overflow."""
    todo: list[tuple[Any, int, str]] = [(schema, 0, "")]
    while todo:
        value, depth, pointer = todo.pop()
        if depth > MAX_VALUE_DEPTH:
            return f"values nested deeper than {MAX_VALUE_DEPTH} levels at {pointer}"
        if isinstance(value, dict):
            todo.extend(
                (v, depth + 1, f"{pointer}/{_pointer_part(str(k))}") for k, v in value.items()
            )
        elif isinstance(value, list):
            todo.extend((v, depth + 1, f"{pointer}/{i}") for i, v in enumerate(value))
    return None


@functools.cache
def json_object_gbnf() -> str:
    """Any JSON object (``response_format`` ``json_object``)."""
    return schema_gbnf({"type": "object"})


#: llguidance's options for the layout :func:`schema_gbnf` writes.
GUIDANCE_LAYOUT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


def guidance_schema(schema: Any, *, layout: bool = True) -> dict[str, Any]:
    """``schema`` as llguidance should enforce it, the same documents in the same layout as
    :func:`schema_gbnf`: objects with ``properties`` take no other keys unless they say so,
    and whitespace is ``json.dumps``'s (``layout``: llguidance reads its options only at the
    top of a schema). Call it on a schema :func:`schema_gbnf` accepted."""
    normalized: Any = copy.deepcopy(schema)
    if not isinstance(normalized, dict):
        normalized = {} if normalized is True else {"not": {}}
    for node in _subschemas(normalized):
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
    if layout:
        normalized["x-guidance"] = dict(GUIDANCE_LAYOUT)
    return dict(normalized)


def _subschemas(schema: Any) -> Iterator[dict[str, Any]]:
    if not isinstance(schema, dict):
        return
    yield schema
    for key in ("properties", "$defs", "definitions"):
        children = schema.get(key)
        if isinstance(children, dict):
            for child in children.values():
                yield from _subschemas(child)
    for key in ("items", "additionalProperties"):
        yield from _subschemas(schema.get(key))
    alternatives = schema.get("anyOf")
    if isinstance(alternatives, list):
        for child in alternatives:
            yield from _subschemas(child)


def _pointer_part(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


class _Converter:
    def __init__(self, root: Any, param: str, rules: RuleSet, hint: str) -> None:
        self.root = root
        self.param = param
        self.rules = rules
        self.hint = hint  # tells apart the rules of several schemas in one grammar
        self.problems: list[str] = []
        self._refs: dict[str, str] = {}
        self._primitives: set[str] = set()

    def problem(self, pointer: str, message: str) -> str:
        self.problems.append(f"{message} at {pointer or '/'}")
        return '"null"'  # a placeholder; the grammar is never used once a problem is found

    def primitive(self, name: str) -> str:
        if name not in self._primitives:
            self._primitives.add(name)
            self.rules.define(name, _PRIMITIVES[name])
            for needed in _NEEDS.get(name, ()):
                self.primitive(needed)
        return name

    # ----------------------------------------------------------------------------- schemas

    def visit(self, schema: Any, pointer: str, depth: int) -> str:
        if depth > MAX_DEPTH:
            return self.problem(pointer, f"subschemas nested deeper than {MAX_DEPTH}")
        if schema is True:
            return self.primitive("value")
        if schema is False:
            return self.problem(pointer, "the schema false, which no value satisfies,")
        if not isinstance(schema, dict):
            return self.problem(pointer, f"a schema must be an object, got {type(schema).__name__}")
        keys = set(schema) - ANNOTATIONS
        for key in sorted(keys - KEYWORDS):
            self.problem(pointer, f"unsupported keyword {key!r}")
        if "$ref" in schema:
            if keys - {"$ref"}:
                return self.problem(pointer, "'$ref' beside other keywords")
            return self.ref(schema["$ref"], pointer, depth)
        if "anyOf" in schema:
            if keys - {"anyOf"}:
                return self.problem(pointer, "'anyOf' beside other keywords")
            return self.any_of(schema["anyOf"], pointer, depth)
        if "const" in schema or "enum" in schema:
            return self.values(schema, pointer, depth)
        kind = schema.get("type")
        if kind is None:
            kind = _implied_type(schema)
            if kind is None:
                return self.primitive("value")
        if isinstance(kind, list):
            if not kind or not all(isinstance(k, str) for k in kind):
                return self.problem(pointer, "'type' must be a name or a non-empty list of names")
            alternatives = [self.typed(k, schema, pointer, depth) for k in dict.fromkeys(kind)]
            return self.rules.add(_hint(pointer, "types"), " | ".join(dict.fromkeys(alternatives)))
        return self.typed(kind, schema, pointer, depth)

    def typed(self, kind: Any, schema: dict[str, Any], pointer: str, depth: int) -> str:
        if kind == "object":
            return self.object(schema, pointer, depth)
        if kind == "array":
            return self.array(schema, pointer, depth)
        if kind == "string":
            return self.string(schema, pointer)
        if kind == "integer":
            return self.integer(schema, pointer)
        if kind == "number":
            for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
                if key in schema:
                    self.problem(pointer, f"{key!r} on a number (only integers take bounds)")
            return self.primitive("number")
        if kind in ("boolean", "null"):
            return self.primitive(kind)
        return self.problem(pointer, f"unknown type {kind!r}")

    def ref(self, ref: Any, pointer: str, depth: int) -> str:
        if isinstance(ref, str) and ref in self._refs:
            return self._refs[ref]
        target = self.resolve(ref, pointer)
        if target is None:
            return '"null"'
        name = self.rules.reserve(self.hint + "-" + _hint(ref[1:], "ref"))
        self._refs[ref] = name
        self.rules.define(name, self.visit(target, ref[1:], depth + 1))
        return name

    def any_of(self, alternatives: Any, pointer: str, depth: int) -> str:
        if not isinstance(alternatives, list) or not alternatives:
            return self.problem(pointer, "'anyOf' must be a non-empty list")
        rules = [
            self.visit(s, f"{pointer}/anyOf/{i}", depth + 1) for i, s in enumerate(alternatives)
        ]
        # The same alternative twice would double llama.cpp's work for nothing, at every level
        # of a schema that nests such anyOfs through $refs.
        return self.rules.add(_hint(pointer, "any-of"), " | ".join(dict.fromkeys(rules)))

    def values(self, schema: dict[str, Any], pointer: str, depth: int) -> str:
        """``enum`` and ``const``: the values that the keywords beside them also accept, each
        written as ``json.dumps`` writes it."""
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                return self.problem(pointer, "'enum' must be a non-empty list")
        if "const" in schema:
            const = schema["const"]
            if "enum" in schema and not any(_json_equal(const, v) for v in values):
                return self.problem(pointer, "'const' that 'enum' beside it does not list")
            values = [const]
        siblings = {k: v for k, v in schema.items() if k not in ("enum", "const")}
        kept: list[str] = []
        for value in values:
            try:
                text = json.dumps(value, ensure_ascii=False, allow_nan=False)
            except ValueError:
                return self.problem(pointer, f"a value JSON cannot hold ({value!r})")
            if self.accepts(value, siblings, pointer, depth) and text not in kept:
                kept.append(text)
        if self.problems:
            return '"null"'
        if not kept:
            keyword = "const" if "const" in schema else "enum"
            return self.problem(
                pointer, f"{keyword!r} whose values the keywords beside it all refuse"
            )
        return self.rules.add(_hint(pointer, "enum"), " | ".join(literal(t) for t in kept))

    def accepts(self, value: Any, schema: Any, pointer: str, depth: int) -> bool:
        """Whether ``schema`` accepts ``value``, by the same keywords and the same reading
        the grammar enforces (an object with ``properties`` takes no other members)."""
        if depth > MAX_DEPTH:
            self.problem(pointer, f"subschemas nested deeper than {MAX_DEPTH}")
            return False
        if isinstance(schema, bool):
            return schema
        if not isinstance(schema, dict):
            self.problem(pointer, f"a schema must be an object, got {type(schema).__name__}")
            return False
        for key in sorted(set(schema) - ANNOTATIONS - KEYWORDS):
            self.problem(pointer, f"unsupported keyword {key!r}")
        if "$ref" in schema:
            target = self.resolve(schema["$ref"], pointer)
            return target is not None and self.accepts(value, target, schema["$ref"][1:], depth + 1)
        if "anyOf" in schema:
            alternatives = schema["anyOf"]
            if not isinstance(alternatives, list) or not alternatives:
                self.problem(pointer, "'anyOf' must be a non-empty list")
                return False
            checks = [
                self.accepts(value, s, f"{pointer}/anyOf/{i}", depth + 1)
                for i, s in enumerate(alternatives)
            ]
            if not any(checks):
                return False
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not any(_json_equal(value, v) for v in values):
                return False
        if "const" in schema and not _json_equal(value, schema["const"]):
            return False
        kind = schema.get("type")
        if kind is not None:
            kinds = kind if isinstance(kind, list) else [kind]
            for k in kinds:
                if k not in TYPES:
                    self.problem(pointer, f"unknown type {k!r}")
            if not any(_is_type(value, k) for k in kinds):
                return False
        return self.accepts_members(value, schema, pointer, depth)

    def accepts_members(self, value: Any, schema: dict[str, Any], pointer: str, depth: int) -> bool:
        """The keywords of one type (each applies only to values of its type)."""
        if isinstance(value, str):
            low = self.bound(schema, "minLength", pointer) or 0
            high = self.bound(schema, "maxLength", pointer)
            return low <= len(value) and (high is None or len(value) <= high)
        if isinstance(value, int | float) and not isinstance(value, bool):
            for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
                bound = schema.get(key)
                if bound is None:
                    continue
                if isinstance(bound, bool) or not isinstance(bound, int | float):
                    self.problem(pointer, f"{key!r} must be a number")
                    return False
                # Python compares an int with a float exactly, however large the int.
                if not {
                    "minimum": value >= bound,
                    "maximum": value <= bound,
                    "exclusiveMinimum": value > bound,
                    "exclusiveMaximum": value < bound,
                }[key]:
                    return False
            return True
        if isinstance(value, list):
            low = self.bound(schema, "minItems", pointer) or 0
            high = self.bound(schema, "maxItems", pointer)
            if len(value) < low or (high is not None and len(value) > high):
                return False
            items = schema.get("items", True)
            return all(self.accepts(v, items, f"{pointer}/items", depth + 1) for v in value)
        if isinstance(value, dict):
            properties = schema.get("properties", {})
            required = schema.get("required", [])
            if not isinstance(properties, dict) or not isinstance(required, list):
                self.problem(pointer, "'properties' must be an object, 'required' a list")
                return False
            if any(name not in value for name in required):
                return False
            extra = schema.get("additionalProperties", not properties)
            for name, member in value.items():
                where = f"{pointer}/properties/{_pointer_part(name)}"
                sub = properties.get(name, extra)
                if not self.accepts(member, sub, where, depth + 1):
                    return False
        return True

    def resolve(self, ref: Any, pointer: str) -> Any:
        """The subschema a local ``$ref`` points at; None (and a problem) when there is none."""
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            self.problem(pointer, f"'$ref' {ref!r} (only references inside the schema)")
            return None
        target: Any = self.root
        for part in ref[2:].split("/") if ref != "#" else []:
            key = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and key in target:
                target = target[key]
            elif isinstance(target, list) and key.isdigit() and int(key) < len(target):
                target = target[int(key)]
            else:
                self.problem(pointer, f"'$ref' {ref!r}, which points at nothing")
                return None
        return target

    def object(self, schema: dict[str, Any], pointer: str, depth: int) -> str:
        properties = schema.get("properties", {})
        if not isinstance(properties, dict):
            return self.problem(pointer, "'properties' must be an object")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            return self.problem(pointer, "'required' must be a list of names")
        for name in required:
            if name not in properties:
                self.problem(pointer, f"required property {name!r} that 'properties' lacks")
        extra_schema = schema.get("additionalProperties")
        if extra_schema is None:
            if not properties:
                return self.primitive("object")  # {"type": "object"}: any object
            extra_schema = False
        extra = None
        if extra_schema is not False and properties:
            # Extra keys written by the grammar could repeat a declared one ({"a": 1, "a": "x"})
            # or spell it with escapes; no grammar of JSON text can rule that out.
            return self.problem(
                pointer,
                "'additionalProperties' other than false beside 'properties' (extra keys "
                "could repeat a declared one; declare every key instead)",
            )
        if extra_schema is not False:
            value = self.visit(extra_schema, f"{pointer}/additionalProperties", depth + 1)
            extra = self.rules.add(
                _hint(pointer, "extra-kv"), f'{self.primitive("string")} ": " {value}'
            )
        members = [
            (
                name in required,
                literal(_dumps(name) + ": ")
                + " "
                + self.visit(sub, f"{pointer}/properties/{_pointer_part(name)}", depth + 1),
            )
            for name, sub in properties.items()
        ]
        memo: dict[tuple[int, bool], str] = {}

        def rest(i: int, first: bool) -> str:
            """Members ``i`` onwards; ``first``: nothing was written before them."""
            if (i, first) in memo:
                return memo[(i, first)]
            if i == len(members):
                if extra is None:
                    body = ""
                elif first:
                    body = f'({extra} (", " {extra})*)?'
                else:
                    body = f'(", " {extra})*'
            else:
                is_required, member = members[i]
                separator = "" if first else '", " '
                present = f"{separator}{member} {rest(i + 1, False)}".strip()
                body = present if is_required else f"({present} | {rest(i + 1, first)})".strip()
            name = self.rules.add(_hint(pointer, "members"), body) if body else ""
            memo[(i, first)] = name
            return name

        inner = rest(0, True)
        return self.rules.add(_hint(pointer, "object"), f'"{{" {inner} "}}"'.replace("  ", " "))

    def array(self, schema: dict[str, Any], pointer: str, depth: int) -> str:
        low = self.bound(schema, "minItems", pointer) or 0
        high = self.bound(schema, "maxItems", pointer)
        if high is not None and low > high:
            return self.problem(pointer, f"'minItems' {low} above 'maxItems' {high}")
        items = schema.get("items", True)
        if not isinstance(items, dict | bool):
            return self.problem(pointer, "'items' must be a schema (a list is 'prefixItems')")
        if high == 0:
            return literal("[]")
        item = self.visit(items, f"{pointer}/items", depth + 1)
        more = f'(", " {item})'
        if low == 0:
            tail = f"{more}*" if high is None else (f"{more}{{0,{high - 1}}}" if high > 1 else "")
            body = f'"[" ({item} {tail})? "]"'
        else:
            if high is None:
                tail = f"{more}{{{low - 1},}}"
            elif high > 1:
                tail = f"{more}{{{low - 1},{high - 1}}}"
            else:
                tail = ""
            body = f'"[" {item} {tail} "]"'
        return self.rules.add(_hint(pointer, "array"), body.replace("  ", " "))

    def string(self, schema: dict[str, Any], pointer: str) -> str:
        low = self.bound(schema, "minLength", pointer) or 0
        high = self.bound(schema, "maxLength", pointer)
        if low == 0 and high is None:
            return self.primitive("string")
        if high is not None and low > high:
            return self.problem(pointer, f"'minLength' {low} above 'maxLength' {high}")
        if high == 0:
            return literal('""')
        char = self.primitive("char")
        count = f"{{{low},}}" if high is None else f"{{{low},{high}}}"
        return self.rules.add(_hint(pointer, "string"), f'"\\"" {char}{count} "\\""')

    def bound(self, schema: dict[str, Any], key: str, pointer: str) -> int | None:
        value = schema.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self.problem(pointer, f"{key!r} must be a non-negative integer")
            return None
        if value > MAX_BOUND:
            self.problem(pointer, f"{key!r} of {value} (at most {MAX_BOUND})")
            return None
        return value

    def integer(self, schema: dict[str, Any], pointer: str) -> str:
        low, high = -_INTEGER_LIMIT, _INTEGER_LIMIT
        for key, is_low, exclusive in (
            ("minimum", True, False),
            ("exclusiveMinimum", True, True),
            ("maximum", False, False),
            ("exclusiveMaximum", False, True),
        ):
            value = schema.get(key)
            if value is None:
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (math.isfinite(value))
            ):
                self.problem(pointer, f"{key!r} must be a number")
                continue
            if is_low:
                bound = math.floor(value) + 1 if exclusive else math.ceil(value)
                low = max(low, bound)
            else:
                bound = math.ceil(value) - 1 if exclusive else math.floor(value)
                high = min(high, bound)
        if (low, high) == (-_INTEGER_LIMIT, _INTEGER_LIMIT):
            return self.primitive("integer")
        if low > high:
            return self.problem(pointer, "integer bounds that no integer meets")
        low, high = max(low, -_INTEGER_LIMIT), min(high, _INTEGER_LIMIT)
        return self.rules.add(_hint(pointer, "integer"), integer_range_gbnf(low, high))


def _implied_type(schema: dict[str, Any]) -> str | None:
    """The type a schema without ``type`` is about, from its keywords (None: any value)."""
    if {"properties", "required", "additionalProperties"} & schema.keys():
        return "object"
    if {"items", "minItems", "maxItems"} & schema.keys():
        return "array"
    if {"minLength", "maxLength"} & schema.keys():
        return "string"
    if {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"} & schema.keys():
        return (
            "integer"
            if all(
                isinstance(schema.get(k, 0), int)
                for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
            )
            else "number"
        )
    return None


def _hint(pointer: str, what: str) -> str:
    """A readable rule name: the property it is for and what it is. It always holds a dash,
    so it never takes the name of a primitive rule (``string``, ``object``...)."""
    last = pointer.rstrip("/").rsplit("/", 1)[-1] if pointer else ""
    return f"{last}-{what}" if last and not last.isdigit() else f"s-{what}"


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _is_type(value: Any, kind: str) -> bool:
    """JSON Schema's types of a JSON value as Python holds it (2.0 is an integer)."""
    if kind == "null":
        return value is None
    if kind == "boolean":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind == "integer":
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if kind == "number":
        return isinstance(value, int | float)
    return isinstance(value, {"string": str, "array": list, "object": dict}.get(kind, ()))


def _json_equal(a: Any, b: Any) -> bool:
    """Equality of JSON values: 1 equals 1.0, but true is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


# ------------------------------------------------------------------------- integer ranges

#: One digit position of a pattern: (lowest digit, highest digit, how many positions).
Digits = tuple[str, str, int]


def integer_range_patterns(low: int, high: int) -> list[tuple[str, list[Digits]]]:
    """Patterns, each a sign and digit positions, that together match exactly the decimal
    integers from ``low`` to ``high`` (no leading zeros, no ``-0``)."""
    patterns: list[tuple[str, list[Digits]]] = []
    if low < 0:
        patterns += [("-", p) for p in _non_negative(max(1, -min(high, -1)), -low)]
    if high >= 0:
        patterns += [("", p) for p in _non_negative(max(low, 0), high)]
    return patterns


def integer_range_gbnf(low: int, high: int) -> str:
    alternatives = []
    for sign, digits in integer_range_patterns(low, high):
        parts = [literal(sign)] if sign else []
        for first, last, count in digits:
            one = literal(first) if first == last else f"[{first}-{last}]"
            parts.append(one if count == 1 else f"{one}{{{count}}}")
        alternatives.append(" ".join(parts))
    return " | ".join(alternatives)


def _non_negative(low: int, high: int) -> list[list[Digits]]:
    patterns: list[list[Digits]] = []
    for width in range(len(str(low)), len(str(high)) + 1):
        start = max(low, 10 ** (width - 1) if width > 1 else 0)
        end = min(high, 10**width - 1)
        if start <= end:
            patterns += _same_width(str(start), str(end))
    return patterns


def _same_width(low: str, high: str) -> list[list[Digits]]:
    """Patterns for the numbers from ``low`` to ``high``, written with the same width."""
    if not low:
        return [[]]
    rest = len(low) - 1
    tail: list[Digits] = [("0", "9", rest)] if rest else []
    if low[0] == high[0]:
        return [[(low[0], low[0], 1), *p] for p in _same_width(low[1:], high[1:])]
    low_full, high_full = low[1:] == "0" * rest, high[1:] == "9" * rest
    patterns: list[list[Digits]] = []
    first = low[0] if low_full else chr(ord(low[0]) + 1)
    last = high[0] if high_full else chr(ord(high[0]) - 1)
    if not low_full:
        patterns += [[(low[0], low[0], 1), *p] for p in _same_width(low[1:], "9" * rest)]
    if first <= last:
        patterns.append([(first, last, 1), *tail])
    if not high_full:
        patterns += [[(high[0], high[0], 1), *p] for p in _same_width("0" * rest, high[1:])]
    return patterns
