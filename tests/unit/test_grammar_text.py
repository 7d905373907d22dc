"""Bytes to text as llama.cpp's grammar reads them: pure, no runtime."""

from __future__ import annotations

import codecs
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgelm_agent.inference.grammar_text import REPLACEMENT, GrammarTextDecoder


def decode_pieces(pieces: list[bytes]) -> str:
    decoder = GrammarTextDecoder()
    return "".join(decoder.decode(piece) for piece in pieces)


class TestGrammarTextDecoder:
    @given(st.text(), st.lists(st.integers(0, 64), max_size=8))
    def test_valid_utf8_decodes_as_python_does_however_it_is_split(self, text, cuts):
        """For UTF-8, the text is Python's, whichever token boundaries cut the characters."""
        data = text.encode("utf-8")
        points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
        pieces = [data[a:b] for a, b in itertools.pairwise(points)]
        assert decode_pieces(pieces) == text

    @pytest.mark.parametrize(
        ("pieces", "text"),
        [
            ([b"\xe0\x80", b"\xa2"], '"'),  # an overlong quote is a quote, as the grammar saw
            ([b"\xc1\x81"], "A"),  # overlong 'A' in two bytes
            ([b"\xed\xa0\x80"], REPLACEMENT),  # a surrogate is one U+FFFD, not three
            ([b"\xf4\x90\x80\x80"], REPLACEMENT),  # past U+10FFFF: one U+FFFD
            ([b"\xfc\x80\x80\x80"], REPLACEMENT),
        ],
    )
    def test_each_sequence_is_the_one_character_llama_cpp_matched(self, pieces, text):
        """Where Python's decoder writes several U+FFFD, this writes what the grammar counted
        as one character, so lengths and structure hold."""
        assert decode_pieces(pieces) == text
        strict = codecs.getincrementaldecoder("utf-8")(errors="replace")
        assert "".join(strict.decode(p) for p in pieces) != text

    def test_a_stray_continuation_byte_is_one_replacement(self):
        """A byte that cannot start a character is U+FFFD, as in Python."""
        assert decode_pieces([b"a\x80b"]) == f"a{REPLACEMENT}b"

    def test_an_unfinished_character_never_comes_out(self):
        """Bytes of a character cut off at the end are dropped, as llama-cpp-python does."""
        assert decode_pieces([b"ok", b"\xe2\x82"]) == "ok"
