"""Operator tokens: random, shown once, kept only as sha256 hashes."""

from __future__ import annotations

import json
import stat

import pytest

from edgelm_provisioning.errors import AlreadyIssued, InvalidValue, NotIssued
from edgelm_provisioning.tokens import TokenFile, token_sha256


@pytest.fixture
def tokens(tmp_path):
    return TokenFile(tmp_path / "tokens.json")


class TestTokenFile:
    def test_a_new_token_is_stored_as_its_hash_only(self, tokens):
        """create returns the plaintext once; the file holds only its sha256."""
        issued = tokens.create("ci", now=5)
        text = tokens.path.read_text()
        assert issued.token not in text
        assert json.loads(text) == {
            "tokens": [{"name": "ci", "sha256": token_sha256(issued.token), "created_at": 5}]
        }
        assert issued.entry.matches(issued.token)
        assert not issued.entry.matches(issued.token + "x")

    def test_tokens_are_random_and_long(self, tokens):
        """Two tokens differ, and each is 32 random bytes in URL-safe base64."""
        a, b = tokens.create("a", now=1).token, tokens.create("b", now=1).token
        assert a != b
        assert len(a) == len(b) == 43

    def test_the_file_is_private(self, tokens):
        """tokens.json is written 0600."""
        tokens.create("ci", now=1)
        assert stat.S_IMODE(tokens.path.stat().st_mode) == 0o600

    def test_a_taken_name_is_refused(self, tokens):
        """A second token under the same name is refused; the first stays valid."""
        first = tokens.create("ci", now=1)
        with pytest.raises(AlreadyIssued) as caught:
            tokens.create("ci", now=2)
        assert caught.value.reference == "token-exists"
        assert tokens.entries() == [first.entry]

    def test_revoke_removes_only_that_token(self, tokens):
        """revoke drops the named entry and keeps the others."""
        tokens.create("a", now=1)
        kept = tokens.create("b", now=1)
        tokens.revoke("a")
        assert tokens.entries() == [kept.entry]

    def test_revoking_an_unknown_name_lists_the_known_ones(self, tokens):
        """Revoking a name never issued says so and names the tokens that exist."""
        tokens.create("ci", now=1)
        with pytest.raises(NotIssued, match="ci"):
            tokens.revoke("nope")

    @pytest.mark.parametrize("name", ["", "a b", "ci/x", "-ci", "c\n"])
    def test_a_name_outside_the_id_alphabet_is_refused(self, tokens, name):
        """Token names use the id alphabet (they appear in logs and the server's audit)."""
        with pytest.raises(InvalidValue):
            tokens.create(name, now=1)
