"""A GBNF grammar read as llama.cpp reads it, and refused when it would abort or stall llama.cpp:
pure, no runtime (tests/integration/test_grammar_runtime.py holds it against llama.cpp itself)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgelm_agent.errors import InvalidRequest
from edgelm_agent.generation.gbnf import check_client_grammar
from edgelm_agent.generation.gbnf_check import (
    MAX_PATHS,
    MAX_RULES,
    GrammarRefused,
    check_gbnf,
    grammar_problem,
)


def doubling(levels: int) -> str:
    """Each level two references to the one below: llama.cpp walks 2**levels paths."""
    rules = ['a0 ::= "x"'] + [f"a{i} ::= a{i - 1} | a{i - 1}" for i in range(1, levels + 1)]
    return f"root ::= a{levels}\n" + "\n".join(rules)


class TestNoCharacterLeft:
    @pytest.mark.parametrize(
        ("grammar", "says"),
        [
            ('root ::= "a" [^\\x01-\\U7FFFFFFF]', "excludes every character"),
            ('root ::= "a" [^\\x01-\\uD7FF\\uE000-\\U0010FFFF]', "excludes every character"),
            ('root ::= "a" [\\U00300000]', "beyond U+10FFFF"),
            ('root ::= "a" [a\\U00110000-\\U7FFFFFFF]', "beyond U+10FFFF"),
            ('root ::= "\\U00200000"', "beyond U+10FFFF"),
            ('root ::= "a" [z-a]', "start is above its end"),
            ('root ::= "a" [^z-a]', "start is above its end"),
            ('root ::= "a" []', "empty character class"),
            ('root ::= "a" [^]', "empty character class"),
            ('root ::= "a" [\\uD800-\\uDFFF]', "surrogates"),
            ('root ::= "\\uDC00"', "surrogate"),
            ('root ::= "a" [\\x00-\\x1F]', "NUL"),
            ('root ::= "\\x001"', "NUL"),
        ],
    )
    def test_a_place_with_no_character_to_write_is_refused(self, grammar, says):
        """Every class and literal must leave the model a character in U+0001-U+10FFFF."""
        with pytest.raises(GrammarRefused, match=re.escape(says)) as info:
            check_gbnf(grammar)
        assert info.value.param == "grammar"
        assert str(info.value).startswith("'grammar' ")

    @pytest.mark.parametrize(
        "grammar",
        [
            'root ::= [^\\x00-\\x1F"]+',  # excluding NUL, or code points past U+10FFFF, is fine
            "root ::= [^\\U00110000-\\UFFFFFFFF]",
            "root ::= [\\u0001-\\uFFFF]",  # a range across the surrogates still has characters
            'root ::= [a-]  # "-" last is the character itself',
            'root ::= "\\U0010FFFF" .',
        ],
    )
    def test_classes_that_leave_a_character_pass(self, grammar):
        """Negated classes may name anything; ranges need only hold one character."""
        check_gbnf(grammar)


class TestWork:
    def test_references_that_double_per_level_are_refused_naming_the_limit(self):
        """31 levels of 'a | a' (2**31 paths) are refused at once, naming the bound; 10
        levels (1024 paths) are at the bound and pass."""
        check_gbnf(doubling(10))
        with pytest.raises(GrammarRefused, match=f"more than {MAX_PATHS} paths"):
            check_gbnf(doubling(11))
        with pytest.raises(GrammarRefused, match=f"more than {MAX_PATHS} paths"):
            check_gbnf(doubling(31))

    def test_nullable_repetitions_count_their_paths(self):
        """A repeated item that may be empty adds a path per repetition: ("a"?){0,1000}."""
        with pytest.raises(GrammarRefused, match="paths"):
            check_gbnf('root ::= ("a"?){0,1000}')

    def test_left_recursion_hidden_behind_a_rule_that_may_be_empty_is_refused(self):
        """x* with x ::= "c"? reaches itself through x before a character; llama.cpp's own
        check only sees alternatives that are literally empty."""
        with pytest.raises(GrammarRefused, match="recurses on its left"):
            check_gbnf('root ::= "a" x* "b"\nx ::= "c"?')

    def test_ordinary_recursion_and_optional_whitespace_pass(self):
        """llama.cpp's own JSON grammar shape: recursion through terminals, optional ws."""
        check_gbnf(
            "root ::= value\n"
            'value ::= object | array | "null" ws\n'
            'object ::= "{" ws (value ("," ws value)*)? "}" ws\n'
            'array ::= "[" ws (value ("," ws value)*)? "]" ws\n'
            "ws ::= [ \\t\\n]*\n"
        )

    def test_long_chains_are_checked_without_recursion(self):
        """2,000 nested repetition rules are walked iteratively, not with Python's stack."""
        check_gbnf("root ::= [a-z]{0,2000} [0-9]{2000}")


class TestRepetitions:
    @pytest.mark.parametrize(
        ("grammar", "says"),
        [
            ('root ::= "a"{3,1}', "minimum is above its maximum"),
            ('root ::= "a"{0,2001}', "at most 2000"),
            ('root ::= "a"{2001,}', "at most 2000"),
            ('root ::= "a"{99999999999999999999}', "at most 2000"),
            ('root ::= ("a" "b"?){0,1001}', "made of 2 rules 1001 times"),
            ('root ::= "a"{0,40}{0,51}', "made of 40 rules 51 times"),
        ],
    )
    def test_bounds_llama_cpp_misreads_or_spins_on_are_refused(self, grammar, says):
        """{3,1} would expand without end; a bound past 2,000 would silently be none."""
        with pytest.raises(GrammarRefused, match=re.escape(says)):
            check_gbnf(grammar)

    def test_size_is_bounded_once_repetitions_are_spelled_out(self):
        """A short text can ask for a huge grammar: rules and elements are counted."""
        with pytest.raises(GrammarRefused, match=f"more than {MAX_RULES} rules"):
            check_gbnf("root ::= " + " ".join(["[a-z]{0,2000}"] * 9))
        with pytest.raises(GrammarRefused, match="elements"):
            check_gbnf("root ::= " + " ".join(['"' + "x" * 500 + '"{2000}'] * 2))


class TestStructure:
    @pytest.mark.parametrize(
        ("grammar", "says"),
        [
            ('root ::= "a" undefined-rule', "refers to rule 'undefined-rule'"),
            ('root ::= "a"\nunused ::= "b"', "'unused', which 'root' never uses"),
            ('root ::= "a"\nroot ::= "b"', "defines rule 'root' twice"),
            ('root ::= x\nx ::= "a" x', "can never finish (in 'x')"),
            ('root ::= x\nx ::= x "a" | "b"', "recurses on its left (in 'x')"),
            ('root ::= x\nx ::= y x "a" | "b"\ny ::= "" | "c"', "recurses on its left"),
            ('root ::= "a" <[2]>', "token"),
            ('root ::= "a" !<[2]>', "token"),
            ('root ::= a_b\na_b ::= "x"', "does not parse"),
            ('root ::= "\\q"', "unknown escape"),
            ('root ::= ("a"', "expecting ')'"),
            ('start ::= "a"', "no 'root"),
        ],
    )
    def test_grammars_that_cannot_finish_or_be_read_are_refused(self, grammar, says):
        """Undefined, unused, twice-defined, endless and left-recursive rules are named."""
        with pytest.raises(GrammarRefused, match=re.escape(says)):
            check_gbnf(grammar)

    def test_client_grammar_size_is_counted_in_bytes(self):
        """64 KiB of UTF-8: a grammar of multi-byte characters reaches it sooner."""
        with pytest.raises(InvalidRequest, match="bytes; at most 65536"):
            check_client_grammar('root ::= "' + "é" * 33000 + '"')

    def test_the_outcome_is_cached_by_text(self):
        """A grammar sent again costs a lookup, whether it passed or not."""
        grammar_problem.cache_clear()
        for _ in range(3):
            grammar_problem('root ::= "a" [z-a]')
            grammar_problem('root ::= "ok"')
        info = grammar_problem.cache_info()
        assert (info.hits, info.misses) == (4, 2)

    @given(st.text(max_size=80))
    def test_any_text_is_refused_or_passed_never_crashes(self, text):
        """Whatever a client sends, the check answers with a reason or None."""
        problem = grammar_problem("root ::= " + text)
        assert problem is None or isinstance(problem, str)
