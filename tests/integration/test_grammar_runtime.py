"""Grammars against llama.cpp itself, on the tiny GGUF model, in this process.

Three promises: what gbnf_check lets through, llama.cpp parses and runs without aborting
(a C++ abort here would take pytest down with it, which counts as a failure); a schema's reply
validates whenever it ends by itself, over many schemas and seeds; and the text of a reply is
what the grammar matched, token by token.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import jsonschema
import llama_cpp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgelm_agent.generation.gbnf import literal
from edgelm_agent.generation.gbnf_check import grammar_problem
from edgelm_agent.generation.structured_output import parse_output_constraint
from edgelm_agent.inference.llama_backend import LlamaCppBackend
from edgelm_agent.inference.loader import load_backend
from edgelm_agent.inference.types import OutputConstraint, SamplingParams
from tests.agent_process import TINY_GGUF

pytestmark = [pytest.mark.llama]
GRAMMAR_RUNS = settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
SCHEMA_RUNS = settings(max_examples=80, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def backend() -> Iterator[LlamaCppBackend]:
    loaded = load_backend(TINY_GGUF, threads=2, context_length=1024)
    assert isinstance(loaded, LlamaCppBackend)
    yield loaded
    loaded.close()


def llama_parses(backend: LlamaCppBackend, grammar: str) -> bool:
    """Whether llama.cpp's own parser takes ``grammar`` (it prints why not to stderr)."""
    sampler = llama_cpp.llama_sampler_init_grammar(backend._vocab, grammar.encode("utf-8"), b"root")
    if not sampler:
        return False
    llama_cpp.llama_sampler_free(sampler)
    return True


def generate(backend: LlamaCppBackend, constraint: OutputConstraint, seed: int, n: int) -> str:
    params = SamplingParams(max_tokens=n, temperature=1.0, seed=seed, constraint=constraint)
    pieces = backend.generate(backend.tokenize("hello"), params, threading.Event())
    out = []
    for piece in pieces:
        out.append(piece)
        if len(out) == n:
            break
    return "".join(out)


# --------------------------------------------------------------------- random grammars

# Code points that matter to the checks (NUL, the surrogates' edges, the last character and
# past it), and ordinary ones.
EDGES = st.sampled_from([0, 1, 0x7F, 0xD7FF, 0xD800, 0xDFFF, 0xE000, 0x10FFFF, 0x110000])
PLAIN = st.integers(0x20, 0x7E) | st.integers(0x80, 0x2FF)
RULE_NAMES = ["r0", "r1", "r2"]


def escaped(code: int) -> str:
    return f"\\U{code:08X}"


def char_class(negated: bool, ranges: list[tuple[int, int]]) -> str:
    body = "".join(escaped(a) if a == b else f"{escaped(a)}-{escaped(b)}" for a, b in ranges)
    return "[" + ("^" if negated else "") + body + "]"


def grammars(*, hostile: bool, recursive: bool) -> st.SearchStrategy[str]:
    """Grammars of literals, classes, '.', references, groups and repetitions. ``hostile``
    ones also hold NUL, surrogates, code points past U+10FFFF, reversed ranges, empty
    classes and empty items under an operator; ``recursive`` ones let any rule refer to any
    (otherwise a rule refers only to those after it, and none recurses)."""
    codes = (PLAIN | EDGES) if hostile else PLAIN
    pairs = st.tuples(codes, codes)
    ranges = st.lists(pairs if hostile else pairs.map(sorted), min_size=0 if hostile else 1)
    literals = st.text(
        alphabet=st.characters(min_codepoint=1, max_codepoint=0x2FF),
        min_size=0 if hostile else 1,
        max_size=4,
    ).map(literal) | st.lists(codes, min_size=1, max_size=3).map(
        lambda c: '"' + "".join(map(escaped, c)) + '"'
    )
    classes = st.builds(char_class, st.booleans(), ranges.map(lambda r: r[:3]))
    operator = st.sampled_from(["", "", "", "*", "+", "?", "{2}", "{0,3}", "{1,}"])

    def sequence(atom: st.SearchStrategy[str], low: int = 0) -> st.SearchStrategy[str]:
        items = st.lists(st.tuples(atom, operator).map("".join), min_size=low, max_size=3)
        return items.map(" ".join)

    def alternatives(names: list[str]) -> st.SearchStrategy[str]:
        leaves = literals | classes | st.just(".")
        atom = st.recursive(
            leaves | st.sampled_from(names) if names else leaves,
            lambda inner: st.lists(sequence(inner), min_size=1, max_size=3).map(
                lambda alternatives: "(" + " | ".join(alternatives) + ")"
            ),
            max_leaves=5,
        )
        # The last alternative is not empty: an empty one at the end of a line would read
        # the next line into it (llama.cpp's parser skips newlines after '|' and '::=').
        return st.builds(
            lambda last, rest: " | ".join([*rest, last]),
            sequence(atom, low=1),
            st.lists(sequence(atom), max_size=2),
        )

    bodies = st.tuples(
        *(
            alternatives(RULE_NAMES if recursive else RULE_NAMES[i + 1 :])
            for i in range(len(RULE_NAMES))
        )
    )
    # root also uses every rule, so that a grammar is rarely refused only for an unused one.
    return st.builds(
        lambda root, rules: (
            f"root ::= {root} | r0 r1 r2\n"
            + "".join(f"{name} ::= {body}\n" for name, body in zip(RULE_NAMES, rules, strict=True))
        ),
        alternatives(RULE_NAMES),
        bodies,
    )


GRAMMARS = st.one_of(
    grammars(hostile=False, recursive=False),
    grammars(hostile=False, recursive=True),
    grammars(hostile=True, recursive=True),
)


# Refusals llama.cpp's own parser agrees with (the others it would take, and regret; its
# left-recursion check misses recursion through a rule that may be empty, so that is not here).
LLAMA_CPP_REFUSES_TOO = ("does not parse", "refers to rule")


class TestAgainstLlamaCpp:
    @GRAMMAR_RUNS
    @given(grammar=GRAMMARS, seed=st.integers(0, 2**16))
    def test_what_the_check_passes_llama_cpp_parses_and_runs(self, backend, grammar, seed):
        """A grammar the check lets through parses in llama.cpp, and sampling under it never
        finds itself with no character to write (which aborts the process)."""
        problem = grammar_problem(grammar)
        if problem is not None:
            if problem.startswith(LLAMA_CPP_REFUSES_TOO):
                assert not llama_parses(backend, grammar), problem
            return
        assert llama_parses(backend, grammar)
        constraint = OutputConstraint(kind="grammar", gbnf=grammar, description="a grammar")
        generate(backend, constraint, seed, 12)

    @pytest.mark.parametrize(
        "grammar",
        [
            'root ::= "a" [^\\x01-\\U7FFFFFFF]',
            'root ::= "a" [\\U00300000]',
            'root ::= "a" [z-a]',
        ],
    )
    def test_grammars_that_abort_llama_cpp_are_the_ones_refused(self, backend, grammar):
        """These parse in llama.cpp (and abort it while sampling): the check refuses them."""
        assert llama_parses(backend, grammar)
        assert grammar_problem(grammar) is not None


# ------------------------------------------------------------------------ JSON schemas

STRINGS = st.builds(
    lambda low, extra: {"type": "string", "minLength": low, "maxLength": low + extra},
    st.integers(0, 4),
    st.integers(0, 4),
)
SCALARS = st.one_of(
    STRINGS,
    st.builds(
        lambda low, width: {"type": "integer", "minimum": low, "maximum": low + width},
        st.integers(-50, 50),
        st.integers(0, 200),
    ),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    # enum beside keywords that rule some of its values out
    st.builds(
        lambda values, high: {"type": "string", "enum": values, "maxLength": high},
        st.lists(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x2FF), max_size=5)).map(
            lambda v: [*v, "ok"]
        ),
        st.integers(2, 4),
    ),
    st.builds(
        lambda values: {"enum": values, "type": "integer", "minimum": 0},
        st.lists(st.integers(-3, 3) | st.booleans() | st.just(1.5), max_size=4).map(
            lambda v: [*v, 0]
        ),
    ),
)


def container(inner: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    names = st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=3, unique=True)
    objects = names.flatmap(
        lambda keys: st.builds(
            lambda members, required: {
                "type": "object",
                "properties": dict(zip(keys, members, strict=True)),
                "required": [k for k, r in zip(keys, required, strict=True) if r],
            },
            st.lists(inner, min_size=len(keys), max_size=len(keys)),
            st.lists(st.booleans(), min_size=len(keys), max_size=len(keys)),
        )
    )
    arrays = st.builds(
        lambda item, low, extra: {
            "type": "array",
            "items": item,
            "minItems": low,
            "maxItems": low + extra,
        },
        inner,
        st.integers(0, 2),
        st.integers(0, 2),
    )
    maps = st.builds(lambda value: {"type": "object", "additionalProperties": value}, inner)
    choices = st.lists(inner, min_size=1, max_size=3).map(lambda s: {"anyOf": s})
    return objects | arrays | maps | choices


SCHEMAS = st.recursive(SCALARS, container, max_leaves=6)


class TestSchemasUnderTheRuntime:
    @SCHEMA_RUNS
    @given(schema=SCHEMAS, seed=st.integers(0, 2**16))
    def test_every_finished_reply_validates(self, backend, schema, seed):
        """Nested objects, arrays, maps, bounded strings and integers, enums beside other
        keywords: a reply that ends by itself parses and jsonschema accepts it."""
        constraint = parse_output_constraint(
            {"response_format": {"type": "json_schema", "json_schema": {"schema": schema}}}
        )
        assert constraint is not None
        budget = 300  # the backend runs until told to stop: the scheduler counts tokens
        params = SamplingParams(
            max_tokens=budget, temperature=1.0, seed=seed, constraint=constraint
        )
        pieces = []
        for piece in backend.generate(backend.tokenize("hello"), params, threading.Event()):
            pieces.append(piece)
            if len(pieces) == budget:
                return  # cut off: no complete document to check
        jsonschema.validate(json.loads("".join(pieces)), schema)

    @pytest.mark.parametrize("seed", range(120))
    def test_string_lengths_hold_over_many_seeds(self, backend, seed):
        """Exactly three Unicode characters, however the model spells them: multi-byte
        characters from byte tokens, control tokens (<s> is three characters to the grammar)."""
        schema = {"type": "string", "minLength": 3, "maxLength": 3}
        constraint = parse_output_constraint(
            {"response_format": {"type": "json_schema", "json_schema": {"schema": schema}}}
        )
        assert constraint is not None
        text = generate(backend, constraint, seed, 60)
        value = json.loads(text)
        assert len(value) == 3, text
        assert "\ufffd" not in value, text  # only characters: no surrogate, nothing past U+10FFFF


class TestReplyText:
    @pytest.mark.parametrize("seed", range(12))
    def test_a_control_token_comes_out_as_the_text_the_grammar_matched(self, backend, seed):
        """'<|im_start|>' may be written as one control token or as characters: either way
        the reply is that text, not an empty string."""
        constraint = OutputConstraint(
            kind="grammar", gbnf='root ::= "<|im_start|>"', description="a grammar"
        )
        assert generate(backend, constraint, seed, 20) == "<|im_start|>"
