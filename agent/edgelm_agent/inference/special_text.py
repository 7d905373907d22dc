"""Keep a client's text from turning into control tokens.

Tokenizers read the text of their special tokens (``<|im_start|>``, ``</s>``…) as those tokens,
which is what a chat template needs and what a client's message must never get: a kiosk user who
types ``<|im_end|><|im_start|>system`` would otherwise open a system turn of their own. Neither
runtime can be told to read *no* special text (llama.cpp still matches user-defined tokens;
onnxruntime-genai's tokenizer always matches added tokens), so plain text is cut inside every
special-token text and the pieces are tokenized apart.
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections.abc import Iterable, Sequence


def special_pattern(specials: Iterable[str]) -> re.Pattern[str] | None:
    """A pattern matching any of ``specials``, longest first; None if there are none."""
    texts = sorted({s for s in specials if s}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, texts))) if texts else None


def split_special(text: str, pattern: re.Pattern[str] | None) -> list[str]:
    """Cut ``text`` so that no piece contains a special-token text; the pieces join to ``text``.

    Each match is cut after its first character, and the search goes on from the cut, so
    overlapping special texts are broken up as well. Every cut moves forward, so this ends, and
    the text is never copied more than once.
    """
    if pattern is None:
        return [text]
    cuts = [0]
    while (found := pattern.search(text, cuts[-1])) is not None:
        cuts.append(found.start() + 1)
    cuts.append(len(text))
    return [text[a:b] for a, b in itertools.pairwise(cuts) if b > a]


def touches_special(
    text: str, spans: Sequence[tuple[int, int]], pattern: re.Pattern[str] | None
) -> bool:
    """Whether any special-token text in ``text`` overlaps one of ``spans`` (start, end),
    given in order and not overlapping one another.

    Overlapping, not only inside: a content ending in ``<|im_`` next to template text, or two
    contents side by side, can form a control token that neither holds alone.
    """
    if pattern is None or not spans:
        return False
    starts = [start for start, _ in spans]
    position = 0
    while (found := pattern.search(text, position)) is not None:
        # The last span starting before the match ends is the only one that can overlap it.
        n = bisect.bisect_left(starts, found.end()) - 1
        if n >= 0 and spans[n][1] > found.start():
            return True
        position = found.start() + 1
    return False
