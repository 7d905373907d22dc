"""A GBNF grammar read the way llama.cpp reads it, and refused before it runs when llama.cpp
would abort the process or stall on it. Pure: no I/O.

llama.cpp's grammar sampler trusts its grammar. Grammars that parse can still hurt it:

* A point where no character is allowed (a class such as ``[^\\x01-\\U7FFFFFFF]``, a reversed
  range ``[z-a]``, a character above U+10FFFF, the NUL character): every token is masked, the
  sampler picks one anyway, accepting it throws from C++, and the process aborts.
* References that fan out before the first character (``a2 ::= a1 | a1``...): the walk
  llama.cpp makes over them when it sets a grammar up, for each request, follows every path,
  so its work doubles with each level; 31 levels stalled a server for 15 s. Paths are
  counted here, from every place a parse can stand, and more than 1,024 refused.
* A rule that reaches itself before writing a character (left recursion, also through rules
  that may be empty, which llama.cpp's own check misses).
* A repetition bound above 2,000, which llama.cpp reads as no bound (or, as a minimum, refuses),
  and ``{3,1}``, which it expands without end.
* A rule that can never finish, one that is never used, one that is undefined or defined
  twice (llama.cpp takes the last definition without a word).

Every grammar, a client's or one built from a JSON schema, is parsed here as llama.cpp parses
it (groups and repetitions become generated rules, the same ones), and checked in time linear
in its size once its repetitions are spelled out. The outcome is cached by text: a schema sent
again costs a dictionary lookup.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from edgelm_agent.errors import InvalidRequest

#: A client's grammar longer than this (UTF-8) is refused: it is a request field, not a program.
MAX_GRAMMAR_BYTES = 64 << 10
#: llama.cpp reads a larger maximum repetition as no bound, and refuses a larger minimum.
MAX_REPEAT = 2000
#: Rules, named and generated (each group and each step of a bounded repetition is one).
MAX_RULES = 1 << 14
#: Elements once repetitions are spelled out: characters, references, alternative ends.
MAX_ELEMENTS = 1 << 17
#: Paths through rule references before a character, from any place a parse can stand.
MAX_PATHS = 1024

LAST_CHAR = 0x10FFFF
SURROGATES = range(0xD800, 0xE000)
#: The characters a model can write: U+0001 to U+10FFFF, surrogates left out.
CHARACTERS = ((0x1, 0xD7FF), (0xE000, LAST_CHAR))

TERMINAL = -1  # an element that matches one character; other elements are rule ids
_WORD = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")
_ESCAPES = {"t": 0x09, "r": 0x0D, "n": 0x0A, "\\": 0x5C, '"': 0x22, "[": 0x5B, "]": 0x5D}
_HEX = {"x": 2, "u": 4, "U": 8}
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_END = "\x00"  # appended to the text; a NUL in the text itself is refused before parsing


class GrammarRefused(InvalidRequest):
    """A grammar llama.cpp must not run. ``reason`` says why without naming the field, so a
    caller can put it in its own words (a schema's error names the schema)."""

    def __init__(self, reason: str, *, param: str = "grammar") -> None:
        super().__init__(f"{param!r} {reason}", param=param)
        self.reason = reason


def check_gbnf(text: str, *, param: str = "grammar") -> None:
    """Raise :class:`GrammarRefused` when ``text`` is a grammar llama.cpp must not see."""
    reason = grammar_problem(text)
    if reason is not None:
        raise GrammarRefused(reason, param=param)


@functools.lru_cache(maxsize=256)
def grammar_problem(text: str, *, unused_rules: bool = False) -> str | None:
    """Why ``text`` must not reach llama.cpp, or None when it may. A client's rule that root
    never uses is a mistake worth naming; ``unused_rules`` lets a built grammar have some."""
    if "\x00" in text:
        return "holds a NUL character"
    try:
        grammar = _Parser(text).parse()
        _Analysis(grammar, unused_rules=unused_rules).run()
    except GrammarRefused as refused:
        return refused.reason
    return None


@dataclass
class _Rule:
    #: The name as written; a generated rule (a group, a repetition) carries its rule's name.
    name: str
    alternatives: list[list[int]] = field(default_factory=list)
    defined: bool = False
    generated: bool = False


@dataclass
class Grammar:
    """Rules as llama.cpp holds them: alternatives of elements, each a rule id or TERMINAL."""

    rules: list[_Rule]
    root: int


# ----------------------------------------------------------------------------------- parsing


class _Parser:
    """llama.cpp's recursive-descent GBNF parser (``llama_grammar_parser``), step for step, so
    that what is checked is what will run; what it would refuse is refused with a reason."""

    def __init__(self, text: str) -> None:
        self.src = text + _END
        self.rules: list[_Rule] = []
        self.ids: dict[str, int] = {}
        self.elements = 0

    def parse(self) -> Grammar:
        pos = self.space(0, newline_ok=True)
        while self.src[pos] != _END:
            pos = self.rule(pos)
        if "root" not in self.ids or not self.rules[self.ids["root"]].defined:
            raise GrammarRefused("has no 'root ::= ...' rule")
        for rule in self.rules:
            if not rule.defined:
                raise GrammarRefused(f"refers to rule {rule.name!r}, which it does not define")
        return Grammar(self.rules, self.ids["root"])

    # -- lexing

    def fail(self, what: str, pos: int) -> GrammarRefused:
        line = self.src.count("\n", 0, pos) + 1
        column = pos - (self.src.rfind("\n", 0, pos) + 1) + 1
        return GrammarRefused(f"does not parse: {what} at line {line}, column {column}")

    def space(self, pos: int, *, newline_ok: bool) -> int:
        src = self.src
        while True:
            ch = src[pos]
            if ch in " \t" or (newline_ok and ch in "\r\n"):
                pos += 1
            elif ch == "#":
                while src[pos] not in "\r\n" + _END:
                    pos += 1
            else:
                return pos

    def name(self, pos: int) -> int:
        end = pos
        while self.src[end] in _WORD:
            end += 1
        if end == pos:
            raise self.fail("expecting a rule name", pos)
        return end

    def integer(self, pos: int) -> tuple[int, int]:
        end = pos
        while self.src[end].isascii() and self.src[end].isdigit():
            end += 1
        if end == pos:
            raise self.fail("expecting an integer", pos)
        # Past nine digits the count is refused anyway; int() of a long run of digits is slow.
        return (int(self.src[pos:end]) if end - pos <= 9 else MAX_REPEAT + 1), end

    def char(self, pos: int, inside: str) -> tuple[int, int]:
        src = self.src
        ch = src[pos]
        if ch == _END:
            raise GrammarRefused(f"has an unterminated {inside}")
        if ch != "\\":
            return ord(ch), pos + 1
        escape = src[pos + 1]
        if escape in _HEX:
            size = _HEX[escape]
            digits = src[pos + 2 : pos + 2 + size]
            if len(digits) != size or not set(digits) <= _HEX_DIGITS:
                raise self.fail(f"expecting {size} hex digits after \\{escape}", pos)
            return int(digits, 16), pos + 2 + size
        if escape in _ESCAPES:
            return _ESCAPES[escape], pos + 2
        if escape == _END:
            raise GrammarRefused(f"has an unterminated {inside}")
        raise self.fail(f"unknown escape \\{escape}", pos)

    # -- rules

    def symbol(self, name: str) -> int:
        rule_id = self.ids.get(name)
        if rule_id is None:
            rule_id = self.ids[name] = self.new_rule(name)
        return rule_id

    def new_rule(self, name: str, *, generated: bool = False) -> int:
        if len(self.rules) >= MAX_RULES:
            raise GrammarRefused(
                f"needs more than {MAX_RULES} rules once its groups and repetitions are spelled out"
            )
        self.rules.append(_Rule(name, generated=generated))
        return len(self.rules) - 1

    def define(self, rule_id: int, alternatives: list[list[int]]) -> None:
        self.elements += sum(len(a) + 1 for a in alternatives)
        if self.elements > MAX_ELEMENTS:
            raise GrammarRefused(
                f"holds more than {MAX_ELEMENTS} elements once its repetitions are spelled out"
            )
        rule = self.rules[rule_id]
        rule.alternatives, rule.defined = alternatives, True

    def rule(self, pos: int) -> int:
        end = self.name(pos)
        name = self.src[pos:end]
        pos = self.space(end, newline_ok=False)
        if self.src[pos : pos + 3] != "::=":
            raise self.fail("expecting '::='", pos)
        rule_id = self.symbol(name)
        if self.rules[rule_id].defined:
            raise GrammarRefused(f"defines rule {name!r} twice")
        pos = self.space(pos + 3, newline_ok=True)
        pos = self.alternates(pos, name, rule_id, nested=False)
        if self.src[pos] == "\r":
            pos += 2 if self.src[pos + 1] == "\n" else 1
        elif self.src[pos] == "\n":
            pos += 1
        elif self.src[pos] != _END:
            raise self.fail("expecting the end of the line", pos)
        return self.space(pos, newline_ok=True)

    def alternates(self, pos: int, name: str, rule_id: int, *, nested: bool) -> int:
        alternatives: list[list[int]] = []
        sequence: list[int] = []
        pos = self.sequence(pos, name, sequence, nested=nested)
        alternatives.append(sequence)
        while self.src[pos] == "|":
            pos = self.space(pos + 1, newline_ok=True)
            sequence = []
            pos = self.sequence(pos, name, sequence, nested=nested)
            alternatives.append(sequence)
        self.define(rule_id, alternatives)
        return pos

    def sequence(self, pos: int, name: str, out: list[int], *, nested: bool) -> int:
        src = self.src
        last_start = len(out)  # where the item a repetition applies to begins
        item_rules = 1  # rules the item stands for, as llama.cpp counts them (see repeat)
        while True:
            ch = src[pos]
            if ch == '"':
                pos += 1
                last_start, item_rules = len(out), 1
                while src[pos] != '"':
                    code, end = self.char(pos, "string literal")
                    _check_literal_char(code, src[pos:end])
                    out.append(TERMINAL)
                    pos = end
                pos = self.space(pos + 1, newline_ok=nested)
            elif ch == "[":
                pos = self.char_class(pos)
                last_start, item_rules = len(out), 1
                out.append(TERMINAL)
                pos = self.space(pos, newline_ok=nested)
            elif ch in _WORD:
                end = self.name(pos)
                ref = self.symbol(src[pos:end])
                pos = self.space(end, newline_ok=nested)
                last_start, item_rules = len(out), 1
                out.append(ref)
            elif ch == "(":
                pos = self.space(pos + 1, newline_ok=True)
                before = len(self.rules)
                sub = self.new_rule(name, generated=True)
                pos = self.alternates(pos, name, sub, nested=True)
                last_start, item_rules = len(out), max(1, len(self.rules) - before)
                out.append(sub)
                if src[pos] != ")":
                    raise self.fail("expecting ')'", pos)
                pos = self.space(pos + 1, newline_ok=nested)
            elif ch == ".":
                last_start, item_rules = len(out), 1
                out.append(TERMINAL)
                pos = self.space(pos + 1, newline_ok=nested)
            elif ch in "*+?":
                if last_start == len(out):
                    raise self.fail(f"expecting an item before {ch!r}", pos)
                low, high = {"*": (0, -1), "+": (1, -1), "?": (0, 1)}[ch]
                pos = self.space(pos + 1, newline_ok=nested)
                item_rules = self.repeat(out, last_start, low, high, name, item_rules)
            elif ch == "{":
                if last_start == len(out):
                    raise self.fail("expecting an item before '{'", pos)
                pos, low, high = self.bounds(pos, nested=nested)
                item_rules = self.repeat(out, last_start, low, high, name, item_rules)
            elif ch == "<" or (ch == "!" and src[pos + 1] == "<"):
                close = src.find(">", pos)
                shown = src[pos : close + 1] if 0 <= close - pos < 40 else src[pos : pos + 12]
                raise GrammarRefused(
                    f"refers to a token ({shown}); token references are not accepted, "
                    "write the text instead"
                )
            else:
                return pos

    def char_class(self, pos: int) -> int:
        """Parse ``[...]`` at ``pos``; refuse it unless it leaves the model a character."""
        src = self.src
        start = pos
        pos += 1
        negated = src[pos] == "^"
        if negated:
            pos += 1
        ranges: list[tuple[int, int]] = []
        while src[pos] != "]":
            low, pos = self.char(pos, "character class")
            high = low
            if src[pos] == "-" and src[pos + 1] != "]":
                if src[pos + 1] == _END:
                    raise GrammarRefused("has an unterminated character class")
                high, pos = self.char(pos + 1, "character class")
            ranges.append((low, high))
        pos += 1
        _check_class(src[start:pos], ranges, negated=negated)
        return pos

    def bounds(self, pos: int, *, nested: bool) -> tuple[int, int, int]:
        """``{m}``, ``{m,}`` or ``{m,n}`` at ``pos``: (next position, m, n or -1)."""
        pos = self.space(pos + 1, newline_ok=nested)
        low, pos = self.integer(pos)
        pos = self.space(pos, newline_ok=nested)
        high = low
        if self.src[pos] == ",":
            pos = self.space(pos + 1, newline_ok=nested)
            high = -1
            if self.src[pos].isascii() and self.src[pos].isdigit():
                high, pos = self.integer(pos)
                pos = self.space(pos, newline_ok=nested)
        if self.src[pos] != "}":
            raise self.fail("expecting '}'", pos)
        for value in (low, high):
            if value > MAX_REPEAT:
                raise GrammarRefused(
                    f"repeats an item {value} times; at most {MAX_REPEAT} (llama.cpp reads a "
                    "larger bound as none)"
                )
        if high != -1 and low > high:
            raise GrammarRefused(
                f"has a repetition {{{low},{high}}} whose minimum is above its maximum"
            )
        return self.space(pos + 1, newline_ok=nested), low, high

    def repeat(
        self, out: list[int], start: int, low: int, high: int, name: str, item_rules: int
    ) -> int:
        """llama.cpp's rewrite: ``S{m,n}`` is S written m times, then n-m nested optional
        rules ``S' ::= S S'' |``; ``S{m,}`` is S m times, then ``S' ::= S S' |``. llama.cpp
        also refuses a repetition whose item stands for more than 2,000 rules once repeated
        (the rules made inside a group, times each repetition of it): returns that count."""
        total = high if high > 0 else max(low, 1)
        if item_rules * total > MAX_REPEAT:
            raise GrammarRefused(
                f"repeats an item made of {item_rules} rules {total} times; llama.cpp refuses "
                f"a repetition of more than {MAX_REPEAT} rules in all"
            )
        item = out[start:]
        cost = len(item) * max(low - 1, 0)
        if cost + self.elements > MAX_ELEMENTS:
            raise GrammarRefused(
                f"holds more than {MAX_ELEMENTS} elements once its repetitions are spelled out"
            )
        if low == 0:
            del out[start:]
        else:
            for _ in range(low - 1):
                out.extend(item)
        optional = 1 if high < 0 else high - low
        last = -1
        for i in range(optional):
            rec = self.new_rule(name, generated=True)
            tail = [rec if high < 0 else last] if (i > 0 or high < 0) else []
            self.define(rec, [item + tail, []])
            last = rec
        if optional > 0:
            out.append(last)
        return item_rules * total


def _char_name(code: int) -> str:
    return f"U+{code:04X}"


def _check_literal_char(code: int, written: str) -> None:
    if code == 0:
        raise GrammarRefused(f"asks for the NUL character ({written}), which no model can write")
    if code > LAST_CHAR:
        raise GrammarRefused(
            f"asks for {written}, beyond U+10FFFF, the last Unicode character: no model can "
            "write it"
        )
    if code in SURROGATES:
        raise GrammarRefused(
            f"asks for {written}, a UTF-16 surrogate, which is not a character a model can write"
        )


def _check_class(text: str, ranges: list[tuple[int, int]], *, negated: bool) -> None:
    """A class must leave the model at least one character; every range in it must be one."""
    if not ranges:
        raise GrammarRefused(
            f"has an empty character class {text}, which llama.cpp reads as nothing at all; "
            "write '.' for any character"
        )
    for low, high in ranges:
        if low > high:
            raise GrammarRefused(
                f"has the range {_char_name(low)}-{_char_name(high)} in {text}, whose start is "
                "above its end, so it matches nothing"
            )
        if negated:
            continue  # excluding what no model writes is harmless
        if low == 0:
            raise GrammarRefused(f"asks for the NUL character ({text}), which no model can write")
        if high > LAST_CHAR:
            raise GrammarRefused(
                f"names {_char_name(high)} in {text}, beyond U+10FFFF, the last Unicode "
                "character: no model can write it"
            )
        if low in SURROGATES and high in SURROGATES:
            raise GrammarRefused(
                f"names only UTF-16 surrogates in {_char_name(low)}-{_char_name(high)} of "
                f"{text}, which are not characters a model can write"
            )
    if negated and _covers(ranges, CHARACTERS):
        raise GrammarRefused(
            f"has the class {text}, which excludes every character from U+0001 to U+10FFFF, "
            "so the model would be left with nothing to write"
        )


def _covers(ranges: list[tuple[int, int]], needed: tuple[tuple[int, int], ...]) -> bool:
    """Whether the union of ``ranges`` holds every code point of ``needed``."""
    merged: list[list[int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], high)
        else:
            merged.append([low, high])
    return all(any(m[0] <= low and high <= m[1] for m in merged) for low, high in needed)


# ---------------------------------------------------------------------------------- analysis


class _Analysis:
    """Checks on the parsed rules, each linear in their size (worklists, no recursion, so a
    chain of 2,000 generated rules cannot overflow Python's stack)."""

    def __init__(self, grammar: Grammar, *, unused_rules: bool) -> None:
        self.rules = grammar.rules
        self.root = grammar.root
        self.unused_rules = unused_rules
        self.cap = MAX_PATHS + 1  # counts saturate here: past it, the exact value is moot
        self.used: list[bool] = []

    def run(self) -> None:
        self.used = self.reachable()
        nullable = self.fixpoint(terminals_satisfy=False)
        productive = self.fixpoint(terminals_satisfy=True)
        stuck = self.endless(productive)
        if stuck is not None:
            raise GrammarRefused(
                f"has a rule that can never finish (in {self.rules[stuck].name!r}): every way "
                "through it leads back into it, so no text ever completes it"
            )
        order = self.leading_order(nullable)
        paths, exits = self.rule_counts(order)
        self.position_counts(paths, exits)

    def endless(self, productive: list[bool]) -> int | None:
        """A used rule that derives no finite text, one on the cycle that causes it (each such
        rule refers to another, so following them from any ends on a cycle); None if none."""
        start = next(
            (i for i in range(len(self.rules)) if self.used[i] and not productive[i]), None
        )
        if start is None:
            return None
        seen: set[int] = set()
        rule_id = start
        while rule_id not in seen:
            seen.add(rule_id)
            rule_id = next(
                element
                for element in self.rules[rule_id].alternatives[0]
                if element != TERMINAL and not productive[element]
            )
        return rule_id

    def reachable(self) -> list[bool]:
        """Which rules 'root' uses; a named rule it does not use is refused."""
        seen = [False] * len(self.rules)
        seen[self.root] = True
        todo = [self.root]
        while todo:
            for alternative in self.rules[todo.pop()].alternatives:
                for element in alternative:
                    if element != TERMINAL and not seen[element]:
                        seen[element] = True
                        todo.append(element)
        unused = [r.name for i, r in enumerate(self.rules) if not seen[i] and not r.generated]
        if unused and not self.unused_rules:
            names = ", ".join(repr(n) for n in unused[:5])
            raise GrammarRefused(
                f"defines {names}, which 'root' never uses; leave unused rules out"
                if len(unused) == 1
                else f"defines rules that 'root' never uses ({names}); leave them out"
            )
        return seen

    def fixpoint(self, *, terminals_satisfy: bool) -> list[bool]:
        """Which rules derive the empty text (``terminals_satisfy`` False) or some finite text
        (True): a rule qualifies once one of its alternatives has every element qualifying."""
        done = [False] * len(self.rules)
        waiting: list[int] = []  # per alternative: elements not yet known to qualify
        owner: list[int] = []
        uses: list[list[int]] = [[] for _ in self.rules]  # rule -> alternatives that use it
        todo: list[int] = []
        for rule_id, rule in enumerate(self.rules):
            for alternative in rule.alternatives:
                index = len(waiting)
                count = 0
                for element in alternative:
                    if element == TERMINAL:
                        count += 0 if terminals_satisfy else 1 << 30
                    else:
                        count += 1
                        uses[element].append(index)
                waiting.append(count)
                owner.append(rule_id)
                if count == 0 and not done[rule_id]:
                    done[rule_id] = True
                    todo.append(rule_id)
        while todo:
            for index in uses[todo.pop()]:
                waiting[index] -= 1
                if waiting[index] == 0 and not done[owner[index]]:
                    done[owner[index]] = True
                    todo.append(owner[index])
        return done

    def leading_order(self, nullable: list[bool]) -> list[int]:
        """Rules in an order where each comes after those it can start with (references
        before its first character); a cycle among those is left recursion."""
        leading: list[list[int]] = []
        for rule in self.rules:
            first: list[int] = []
            for alternative in rule.alternatives:
                for element in alternative:
                    if element == TERMINAL:
                        break
                    first.append(element)
                    if not nullable[element]:
                        break
            leading.append(first)
        state = [0] * len(self.rules)  # 0 new, 1 on the path, 2 done
        order: list[int] = []
        for start in range(len(self.rules)):
            if state[start]:
                continue
            state[start] = 1
            stack = [(start, 0)]
            while stack:
                rule_id, i = stack[-1]
                if i < len(leading[rule_id]):
                    stack[-1] = (rule_id, i + 1)
                    child = leading[rule_id][i]
                    if state[child] == 1:
                        raise GrammarRefused(
                            f"has a rule that recurses on its left (in "
                            f"{self.rules[child].name!r}): it reaches itself again before "
                            "writing a character"
                        )
                    if state[child] == 0:
                        state[child] = 1
                        stack.append((child, 0))
                else:
                    state[rule_id] = 2
                    order.append(rule_id)
                    stack.pop()
        return order

    def rule_counts(self, order: list[int]) -> tuple[list[int], list[int]]:
        """Per rule: the stacks llama.cpp reaches expanding a reference to it (paths to a first
        character), and the ways it can end without writing any (exits)."""
        cap = self.cap
        paths = [0] * len(self.rules)
        exits = [0] * len(self.rules)
        for rule_id in order:
            total_paths = total_exits = 0
            for alternative in self.rules[rule_id].alternatives:
                ways = 1
                for element in alternative:
                    if element == TERMINAL:
                        total_paths += ways
                        ways = 0
                        break
                    total_paths += ways * paths[element]
                    ways = min(cap, ways * exits[element])
                    if ways == 0:
                        break
                total_exits += ways
                total_paths, total_exits = min(cap, total_paths), min(cap, total_exits)
            paths[rule_id], exits[rule_id] = total_paths, total_exits
        return paths, exits

    def position_counts(self, paths: list[int], exits: list[int]) -> None:
        """From every place a parse can stand, the paths through references to a first
        character, and the ways to reach the end of the alternative without one."""
        cap = self.cap
        worst = (paths[self.root] + exits[self.root], self.root)
        for rule_id, rule in enumerate(self.rules):
            if not self.used[rule_id]:
                continue  # a repetition of none, {0}, leaves its generated rule behind
            for alternative in rule.alternatives:
                after_paths, after_exits = 0, 1  # the end of the alternative
                for element in reversed(alternative):
                    if element == TERMINAL:
                        after_paths, after_exits = 1, 0
                        continue
                    after_paths = min(cap, paths[element] + exits[element] * after_paths)
                    after_exits = min(cap, exits[element] * after_exits)
                    worst = max(worst, (after_paths + after_exits, rule_id))
        if worst[0] > MAX_PATHS:
            raise GrammarRefused(
                f"branches into more than {MAX_PATHS} paths before a character (in "
                f"{self.rules[worst[1]].name!r}); llama.cpp follows each one to set the "
                "grammar up: merge alternatives that are alike"
            )
