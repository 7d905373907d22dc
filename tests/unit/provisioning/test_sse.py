"""The server-sent events decoder: the same events whatever the chunking and line endings."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgelm_provisioning.errors import ControlProtocolError
from edgelm_provisioning.sse import ServerSentEvent, SSEDecoder, encode_event

NAMES = st.sampled_from(["device", "rollout", "job"])
DATA = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=30)
EVENTS = st.lists(
    st.builds(ServerSentEvent, NAMES, st.lists(DATA, min_size=1, max_size=3).map("\n".join)),
    max_size=6,
)


def decode(chunks: list[bytes]) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    return [event for chunk in chunks for event in decoder.feed(chunk)]


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


class TestSSEDecoder:
    @given(
        EVENTS, st.lists(st.integers(0, 10_000), max_size=20), st.sampled_from(["\n", "\r\n", "\r"])
    )
    def test_any_chunking_and_line_ending_gives_the_same_events(self, events, cuts, newline):
        """Events survive any split of the bytes and LF, CRLF or CR line ends."""
        wire = b"".join(encode_event(e) for e in events).replace(b"\n", newline.encode())
        assert decode(split(wire, cuts)) == events

    def test_comments_and_unknown_fields_are_ignored(self):
        """Keep-alive comments and fields such as retry do not make events."""
        wire = b": keep-alive\n\nretry: 10\nevent: job\ndata: {}\n\n"
        assert decode([wire]) == [ServerSentEvent("job", "{}")]

    def test_an_event_without_data_is_not_dispatched(self):
        """A blank line after only an event name dispatches nothing."""
        assert decode([b"event: rollout\n\n"]) == []

    def test_the_default_type_is_message_and_ids_are_kept(self):
        """Without an event field the type is 'message'; the last id travels with it."""
        assert decode([b"id: 7\ndata: x\n\n"]) == [ServerSentEvent("message", "x", "7")]

    def test_only_one_space_after_the_colon_is_dropped(self):
        """'data:  x' keeps the second space, as the standard says."""
        assert decode([b"data:  x\n\n"]) == [ServerSentEvent("message", " x")]

    def test_an_endless_line_is_refused(self):
        """A server that never ends a line hits the size limit instead of filling memory."""
        decoder = SSEDecoder(max_event_bytes=1000)
        for _ in range(4):
            decoder.feed(b"data: " + b"x" * 200)
        with pytest.raises(ControlProtocolError):
            decoder.feed(b"data: " + b"x" * 200)

    def test_many_data_lines_past_the_limit_are_refused(self):
        """Short lines that add up past the limit in one event are refused too."""
        decoder = SSEDecoder(max_event_bytes=1000)
        with pytest.raises(ControlProtocolError):
            decoder.feed(b"data: xxxxxxxxx\n" * 200)
