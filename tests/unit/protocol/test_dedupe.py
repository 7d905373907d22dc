"""RecentIds: a bounded, insertion-ordered memory of message ids for dropping duplicates."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgelm_protocol import RecentIds


class TestRecentIds:
    def test_first_sighting_is_admitted_and_the_second_dropped(self) -> None:
        """admit says True for a new id and False for a redelivery."""
        recent = RecentIds(3)
        assert recent.admit("a") is True
        assert recent.admit("a") is False
        assert "a" in recent
        assert len(recent) == 1

    def test_oldest_is_evicted_at_capacity(self) -> None:
        """The fourth id pushes out the first."""
        recent = RecentIds(3)
        for message_id in "abcd":
            recent.admit(message_id)
        assert list(recent) == ["b", "c", "d"]
        assert recent.admit("a") is True  # forgotten, so admitted again

    def test_a_duplicate_does_not_refresh_its_place(self) -> None:
        """Seeing an id again keeps its original place in the eviction order."""
        recent = RecentIds(2)
        recent.admit("a")
        recent.admit("b")
        recent.admit("a")
        recent.admit("c")
        assert list(recent) == ["b", "c"]

    def test_restores_from_a_saved_list(self) -> None:
        """A memory saved with list() and given back as seen behaves the same."""
        recent = RecentIds(3)
        for message_id in "abcde":
            recent.admit(message_id)
        restored = RecentIds(3, seen=list(recent))
        assert list(restored) == list(recent)
        assert restored.admit("e") is False

    @pytest.mark.parametrize("capacity", [0, -1, True, 2.5])
    def test_capacity_must_be_a_positive_int(self, capacity: object) -> None:
        """A memory of nothing would admit every duplicate; that is a configuration bug."""
        with pytest.raises(ValueError, match="capacity"):
            RecentIds(capacity)  # type: ignore[arg-type]

    @given(
        capacity=st.integers(1, 8),
        stream=st.lists(st.sampled_from("abcdefghijkl"), max_size=60),
    )
    def test_matches_a_fifo_model(self, capacity: int, stream: list[str]) -> None:
        """admit agrees, step by step, with a plain list kept in first-sighting order."""
        recent = RecentIds(capacity)
        model: list[str] = []
        for message_id in stream:
            expected = message_id not in model
            if expected:
                model.append(message_id)
                del model[:-capacity]
            assert recent.admit(message_id) is expected
            assert list(recent) == model
            assert len(recent) <= capacity
