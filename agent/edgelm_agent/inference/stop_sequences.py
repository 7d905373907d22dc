"""Stop strings over a stream of text fragments.

A stop string can straddle fragments ("Hel" + "lo"), so text that could be the start of a stop
string is held back until the next fragment decides. The stop string itself is never emitted,
matching OpenAI's behaviour.
"""

from __future__ import annotations


class StopMatcher:
    """Feed fragments in order; get back what is safe to emit and whether a stop string hit."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def feed(self, fragment: str) -> str:
        """Return the text that can be emitted now. After a hit, returns ``""`` forever."""
        if self.stopped:
            return ""
        if not self._stops:
            return fragment
        text = self._held + fragment
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            self._held = ""
            return text[:cut]
        keep = self._longest_partial_suffix(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """Generation ended without a hit: release whatever was held back."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _first_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        return min(hits) if hits else None

    def _longest_partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
