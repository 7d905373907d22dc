"""The flat TOML writer: whatever it writes, tomllib reads back exactly."""

from __future__ import annotations

import tomllib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgelm_provisioning.errors import InvalidValue
from edgelm_provisioning.toml_file import dump_toml, load_toml, toml_string

TEXT = st.text(st.characters(codec="utf-8"), max_size=40)  # no lone surrogates
KEYS = st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True)
VALUES = st.one_of(TEXT, st.integers(-(2**63), 2**63 - 1), st.booleans())


class TestTomlString:
    @given(TEXT)
    def test_any_text_reads_back_unchanged(self, text):
        """Quotes, backslashes, control characters and DEL all survive the round trip."""
        assert tomllib.loads(f"v = {toml_string(text)}")["v"] == text

    def test_control_characters_are_escaped(self):
        """A NUL, a newline and DEL are written as escapes, never raw."""
        written = toml_string("a\x00b\nc\x7f")
        assert "\x00" not in written
        assert "\n" not in written
        assert "\x7f" not in written

    def test_a_lone_surrogate_is_refused(self):
        """A lone surrogate cannot be UTF-8, so it is refused rather than written."""
        with pytest.raises(InvalidValue):
            toml_string("\ud800")


class TestDumpToml:
    @given(st.dictionaries(KEYS, VALUES, max_size=8))
    def test_a_flat_table_reads_back_unchanged(self, values):
        """Strings, integers and booleans of a flat table read back as written."""
        assert tomllib.loads(dump_toml(values)) == values

    def test_comments_go_above_their_key(self):
        """A comment is written on the line before its key."""
        text = dump_toml({"fleet": "acme"}, comments={"fleet": "the fleet's id"})
        assert text == '# the fleet\'s id\nfleet = "acme"\n'

    def test_a_key_that_is_not_bare_is_refused(self):
        """Keys are bare TOML keys: a dotted or spaced key is refused."""
        with pytest.raises(InvalidValue):
            dump_toml({"a.b": "x"})

    def test_a_malformed_file_names_itself(self, tmp_path):
        """Reading a file that is not TOML raises InvalidValue naming the file."""
        path = tmp_path / "fleet.toml"
        path.write_text("fleet = ")
        with pytest.raises(InvalidValue, match=r"fleet\.toml"):
            load_toml(path)
