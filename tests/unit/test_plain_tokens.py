"""plain_tokens: a client's text cut around special-token texts, encoded without changes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from edgelm_agent.inference.special_text import plain_tokens, special_pattern

SPECIALS = ["<|end|>", "<|user|>", "<|assistant|>", "<s>", "</s>"]
PATTERN = special_pattern(SPECIALS)
ALPHABET = st.sampled_from([*SPECIALS, "<", "|", ">", "s", "/", "end", "user", " ", "\n", "é"])
TEXT = st.lists(ALPHABET, max_size=30).map("".join)


class SentencePieceLike:
    """Encodes per character, and begins every text with a word start, ▁, as SentencePiece
    tokenizers do; records each call."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, text: str) -> list[int]:
        self.calls.append(text)
        return [ord(c) for c in "▁" + text.replace(" ", "▁")] if text else []


class TestPlainTokens:
    @given(TEXT)
    def test_the_text_is_encoded_as_if_whole(self, text: str) -> None:
        """Cut or not, the tokens are those of the whole text in one call: no word start
        is added at a cut, and none of the pieces holds a special text."""
        assert PATTERN is not None
        encode = SentencePieceLike()
        assert plain_tokens(text, PATTERN, encode) == SentencePieceLike()(text)
        assert not any(PATTERN.search(call) for call in encode.calls)

    def test_text_without_specials_is_one_call(self) -> None:
        """Plain text costs one encode call, as before."""
        encode = SentencePieceLike()
        plain_tokens("where are the maps?", PATTERN, encode)
        assert encode.calls == ["where are the maps?"]

    def test_a_cut_piece_goes_behind_a_newline(self) -> None:
        """Each piece after a cut is encoded behind the joiner, whose tokens are dropped."""
        encode = SentencePieceLike()
        tokens = plain_tokens("hi<|end|>", PATTERN, encode)
        assert encode.calls == ["hi<", "\n", "\n|end|>"]
        assert tokens == [ord(c) for c in "▁hi<|end|>"]

    def test_a_joiner_that_merges_falls_back_to_the_piece_alone(self) -> None:
        """Where the joiner's tokens do not come out first (it merged with the piece), the
        piece is encoded alone rather than losing a token of its own."""

        def merging(text: str) -> list[int]:
            return [0] if text == "\n|end|>" else [ord(c) for c in text]

        assert plain_tokens("a<|end|>", PATTERN, merging) == [ord(c) for c in "a<|end|>"]

    def test_empty_text_has_no_tokens(self) -> None:
        """Nothing in, nothing out, and no call."""
        encode = SentencePieceLike()
        assert plain_tokens("", PATTERN, encode) == []
        assert encode.calls == []
