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
from collections.abc import Callable, Iterable, Sequence


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


#: Written before each piece after a cut, then its tokens are dropped (see plain_tokens).
JOINER = "\n"


def plain_tokens(
    text: str, pattern: re.Pattern[str] | None, encode: Callable[[str], list[int]]
) -> list[int]:
    """The tokens of ``text`` read as plain text: cut by :func:`split_special`, each piece
    encoded apart by ``encode``.

    SentencePiece-style tokenizers (Llama 2, Phi-3) begin every text they encode with a word
    start, a space: encoded apart, the pieces would get a space at every cut, and the model
    would read ``<|end|>`` as ``< |end|>``. So each piece after the first is encoded behind a
    newline (which begins every text alike and joins no piece) and the newline's tokens are
    dropped; where they do not come first, the piece is encoded alone.
    """
    pieces = split_special(text, pattern)
    tokens = encode(pieces[0]) if pieces else []
    lead = encode(JOINER) if len(pieces) > 1 else []
    for piece in pieces[1:]:
        joined = JOINER + piece
        both = encode(joined) if pattern is None or not pattern.search(joined) else []
        if lead and both[: len(lead)] == lead:
            tokens += both[len(lead) :]
        else:
            tokens += encode(piece)
    return tokens


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
