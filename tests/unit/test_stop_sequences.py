"""StopMatcher: stop strings over fragmented text."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from edgelm_agent.inference.stop_sequences import StopMatcher


def run(stops: tuple[str, ...], fragments: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out = "".join(matcher.feed(f) for f in fragments)
    return out + matcher.flush(), matcher.stopped


class TestStopMatcher:
    def test_no_stops_passes_text_through(self):
        """Without stop strings every fragment is emitted at once."""
        matcher = StopMatcher(())
        assert matcher.feed("abc") == "abc"
        assert matcher.flush() == ""

    def test_stop_inside_one_fragment_cuts_before_it(self):
        """Text before the stop string is emitted; the stop string and after are not."""
        assert run(("END",), ["hello END world"]) == ("hello ", True)

    def test_stop_straddling_fragments_is_found(self):
        """A stop string split across fragments still stops, and none of it leaks."""
        matcher = StopMatcher(("END",))
        assert matcher.feed("abc E") == "abc "
        assert matcher.feed("N") == ""
        assert matcher.feed("D more") == ""
        assert matcher.stopped

    def test_held_prefix_is_released_when_it_does_not_complete(self):
        """A partial match that turns out not to be a stop string is emitted."""
        assert run(("END",), ["abc E", "Nx"]) == ("abc ENx", False)

    def test_held_prefix_is_flushed_at_the_end(self):
        """Text held back at the end of generation is released by flush()."""
        assert run(("END",), ["abc EN"]) == ("abc EN", False)

    def test_earliest_of_several_stops_wins(self):
        """With several stop strings, the one that appears first cuts the text."""
        assert run(("B", "A"), ["xxAyyB"]) == ("xx", True)

    def test_nothing_after_a_hit(self):
        """After a stop, further fragments produce nothing."""
        matcher = StopMatcher(("x",))
        matcher.feed("ax")
        assert matcher.feed("more") == ""
        assert matcher.flush() == ""

    @given(
        text=st.text(alphabet="abcE", max_size=60),
        stop=st.text(alphabet="abcE", min_size=1, max_size=4),
        cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=10),
    )
    def test_fragmentation_never_changes_the_result(self, text, stop, cuts):
        """However the text is split into fragments, the output equals the unsplit reference."""
        bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
        fragments = [text[a:b] for a, b in itertools.pairwise(bounds)]
        index = text.find(stop)
        expected = (text[:index], True) if index >= 0 else (text, False)
        assert run((stop,), fragments) == expected
