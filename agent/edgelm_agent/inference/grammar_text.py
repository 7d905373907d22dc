"""Bytes to text the way llama.cpp's grammar reads them, for replies generated under a grammar.
Pure: no I/O.

llama.cpp matches a token against the grammar by decoding its bytes with a decoder of its own
that checks nothing: an overlong form (``E0 80 A2``) is the character it spells (``"``), and
byte sequences that are not UTF-8 at all still give a number. Python's strict decoder turns
the same bytes into several U+FFFD, so a reply the grammar held to a three-character string,
or to a closing quote, would come out as text the grammar never allowed. This decoder gives
back what the grammar saw: the character where it is one, U+FFFD where the number is no
character (a surrogate, past U+10FFFF, a stray byte). For valid UTF-8 it equals Python's.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"
# Bytes still to come after a lead byte, by its top four bits, as llama.cpp's decode_utf8 has
# it; -1 marks a continuation byte where a lead byte should be.
_FOLLOWING = (0, 0, 0, 0, 0, 0, 0, 0, -1, -1, -1, -1, 1, 1, 2, 3)


def _char(code: int) -> str:
    if 0xD800 <= code <= 0xDFFF or code > 0x10FFFF:
        return REPLACEMENT
    return chr(code)


class GrammarTextDecoder:
    """An incremental decoder: feed it each token's bytes; a character split across tokens
    comes out with the token that completes it, and one left incomplete never comes out."""

    def __init__(self) -> None:
        self._value = 0
        self._remaining = 0

    def decode(self, data: bytes) -> str:
        out: list[str] = []
        for byte in data:
            if self._remaining:
                if byte >> 6 != 0b10:  # llama.cpp rejects such a token; never under a grammar
                    out.append(REPLACEMENT)
                    self._remaining = 0
                else:
                    self._value = (self._value << 6) | (byte & 0x3F)
                    self._remaining -= 1
                    if not self._remaining:
                        out.append(_char(self._value))
                    continue
            following = _FOLLOWING[byte >> 4]
            if following < 0:
                out.append(REPLACEMENT)
            elif following == 0:
                out.append(_char(byte))
            else:
                self._value = byte & ((1 << (7 - following)) - 1)
                self._remaining = following
        return "".join(out)
