"""Keep a client's text from turning into control tokens.

Tokenizers read the text of their special tokens (``<|im_start|>``, ``</s>``…) as those tokens,
which is what a chat template needs and what a client's message must never get: a kiosk user who
types ``<|im_end|><|im_start|>system`` would otherwise open a system turn of their own. llama.cpp
can tokenize without reading special tokens; onnxruntime-genai's tokenizer cannot, so for it the
text is cut inside every special-token text and the pieces are tokenized apart.
"""

from __future__ import annotations

import re
from collections.abc import Iterable


def special_pattern(specials: Iterable[str]) -> re.Pattern[str] | None:
    """A pattern matching any of ``specials``, longest first; None if there are none."""
    texts = sorted({s for s in specials if s}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, texts))) if texts else None


def split_special(text: str, pattern: re.Pattern[str] | None) -> list[str]:
    """Cut ``text`` so that no piece contains a special-token text; the pieces join to ``text``.

    Each match is cut after its first character. What follows the cut is searched again, so
    overlapping special texts are broken up as well; every cut shortens the rest, so this ends.
    """
    if pattern is None:
        return [text]
    pieces: list[str] = []
    rest = text
    while (found := pattern.search(rest)) is not None:
        cut = found.start() + 1
        pieces.append(rest[:cut])
        rest = rest[cut:]
    pieces.append(rest)
    return [p for p in pieces if p]
