"""GBNF, llama.cpp's grammar format: quoting literals, building rule sets, and checking a
client's grammar before it reaches the runtime. Pure: no I/O.

Why check a client's grammar at all: llama.cpp refuses a grammar that does not parse, but one
that parses and then leaves no token to pick (an empty class, a character no token yields, an
end-of-generation token by reference) makes the runtime throw from C++ and kills the process,
and one whose rules fan out stalls it. :mod:`.gbnf_check` reads a grammar as llama.cpp does and
refuses those, with the reason, before they run.
"""

from __future__ import annotations

import re

from edgelm_agent.errors import InvalidRequest
from edgelm_agent.generation.gbnf_check import MAX_GRAMMAR_BYTES, check_gbnf

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def literal(text: str) -> str:
    """``text`` as a GBNF string literal; other control characters as ``\\xNN``."""
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


class RuleSet:
    """Named rules, each defined once; an identical body reuses the rule that has it."""

    def __init__(self) -> None:
        self._rules: dict[str, str] = {}
        self._by_body: dict[str, str] = {}

    def add(self, hint: str, body: str) -> str:
        """A rule named after ``hint`` whose body is ``body``; returns its name."""
        existing = self._by_body.get(body)
        if existing is not None:
            return existing
        name = self.reserve(hint)
        self.define(name, body)
        return name

    def reserve(self, hint: str) -> str:
        """A fresh rule name, for a rule that refers to itself before it is defined. It always
        holds a dash: names without one are left to fixed rules defined with :meth:`define`."""
        base = re.sub(r"[^a-zA-Z0-9-]+", "-", hint).strip("-").lower()
        if "-" not in base or base[0].isdigit():
            base = "r-" + base
        name, n = base, 1
        while name in self._rules or name == "root":
            n += 1
            name = f"{base}-{n}"
        self._rules[name] = ""
        return name

    def define(self, name: str, body: str) -> None:
        self._rules[name] = body
        self._by_body.setdefault(body, name)

    def text(self, root: str) -> str:
        lines = [f"root ::= {root}"]
        lines += [f"{name} ::= {body}" for name, body in self._rules.items()]
        return "\n".join(lines) + "\n"


def check_client_grammar(text: str, param: str = "grammar") -> None:
    """Refuse a client's grammar that llama.cpp must not see (see :mod:`.gbnf_check`)."""
    if not text.strip():
        raise InvalidRequest(f"{param!r} is empty; expected a GBNF grammar", param=param)
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if size > MAX_GRAMMAR_BYTES:
        raise InvalidRequest(
            f"{param!r} is {size} bytes; at most {MAX_GRAMMAR_BYTES} are accepted", param=param
        )
    check_gbnf(text, param=param)
