"""Cutting a client's text so that no piece holds a special-token text."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from edgelm_agent.inference.special_text import special_pattern, split_special, touches_special

SPECIALS = ["<|im_start|>", "<|im_end|>", "</s>", "<s>", "<|endoftext|>"]
PATTERN = special_pattern(SPECIALS)

# Text built mostly from the specials' own characters, so they occur, overlap and nest.
ALPHABET = st.sampled_from([*SPECIALS, "<", "|", ">", "s", "/", "im_", "start", "end", " ", "é"])
TEXT = st.lists(ALPHABET, max_size=40).map("".join)


@given(TEXT)
def test_pieces_join_to_the_text_and_hold_no_special(text: str) -> None:
    pieces = split_special(text, PATTERN)
    assert "".join(pieces) == text
    assert all(piece for piece in pieces)
    for piece in pieces:
        assert not any(special in piece for special in SPECIALS), (text, pieces)


def test_text_without_specials_is_one_piece() -> None:
    assert split_special("plain <b>text</b> | >", PATTERN) == ["plain <b>text</b> | >"]


def test_a_special_is_cut_after_its_first_character() -> None:
    assert split_special("a<|im_start|>b", PATTERN) == ["a<", "|im_start|>b"]


def test_no_specials_means_no_cutting() -> None:
    assert special_pattern([]) is None
    assert split_special("<|im_start|>", None) == ["<|im_start|>"]


def test_a_special_inside_template_text_alone_does_not_touch_contents() -> None:
    text = "<|im_start|>user\nhello<|im_end|>"
    content = (text.index("hello"), text.index("hello") + 5)
    assert not touches_special(text, [content], PATTERN)


def test_a_special_reaching_into_a_content_touches_it() -> None:
    text = "<|im_start|>user\nhi<|im_end|>"  # as if the content were "hi<|im_"
    content = (text.index("hi"), text.index("hi") + len("hi<|im_"))
    assert touches_special(text, [content], PATTERN)
    assert not touches_special(text, [], PATTERN)
    assert not touches_special(text, [content], None)
