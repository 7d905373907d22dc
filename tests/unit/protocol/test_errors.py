"""The error tree: one root, a snake_case code on every class, messages safe to log."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

import edgelm_protocol
from edgelm_protocol import errors
from edgelm_protocol.errors import (
    DesiredStateRefused,
    ExpiredDesiredState,
    ForgedDesiredState,
    InvalidId,
    InvalidTopic,
    MalformedMessage,
    MessageRefused,
    MessageTooLarge,
    ProtocolError,
    StaleDesiredState,
    TopicMismatch,
    UnsupportedVersion,
    WrongDevice,
    shown,
)

ALL_EXCEPTIONS = [
    value
    for value in vars(errors).values()
    if isinstance(value, type) and issubclass(value, Exception)
]
ALL_ERRORS = [error for error in ALL_EXCEPTIONS if issubclass(error, ProtocolError)]


class TestErrorTree:
    def test_every_error_descends_from_the_root(self) -> None:
        """Catching ProtocolError catches every error the package defines."""
        assert len(ALL_EXCEPTIONS) >= 14
        assert ALL_ERRORS == ALL_EXCEPTIONS

    def test_codes_are_snake_case_and_unique(self) -> None:
        """Each class has its own snake_case code, so logs can be grouped by it."""
        codes = [error.code for error in ALL_ERRORS]
        assert all(re.fullmatch(r"[a-z]+(_[a-z]+)*", code) for code in codes)
        assert len(set(codes)) == len(codes)

    def test_families_split_by_who_is_at_fault(self) -> None:
        """Wire faults are MessageRefused; refusals of a desired state are DesiredStateRefused."""
        wire = [InvalidTopic, MessageTooLarge, MalformedMessage, UnsupportedVersion, TopicMismatch]
        desired = [ForgedDesiredState, WrongDevice, StaleDesiredState, ExpiredDesiredState]
        assert all(issubclass(error, MessageRefused) for error in wire)
        assert all(issubclass(error, DesiredStateRefused) for error in desired)
        assert not any(issubclass(error, MessageRefused) for error in desired)

    def test_the_package_exports_the_whole_tree(self) -> None:
        """Every error class is importable from the package root."""
        assert {error.__name__ for error in ALL_ERRORS} <= set(edgelm_protocol.__all__)

    def test_message_names_the_topic_once_known(self) -> None:
        """A refused message's text starts with its topic when decode filled it in."""
        error = MalformedMessage("body.seq must be an integer", field="body.seq")
        assert str(error) == "body.seq must be an integer"
        error.topic = "edgelm/v1/acme/dev/kiosk-17/events"
        assert str(error) == (
            "message on 'edgelm/v1/acme/dev/kiosk-17/events': body.seq must be an integer"
        )
        assert error.field == "body.seq"

    def test_attributes_carry_the_values(self) -> None:
        """Callers read attributes, never parse the message."""
        stale = StaleDesiredState(sequence=4, last_applied=7)
        expired = ExpiredDesiredState(expires=100, now=150, sequence=9)
        too_large = MessageTooLarge(size_bytes=2000, limit_bytes=1024, what="presence")
        version = UnsupportedVersion(2, supported=1)
        assert (stale.sequence, stale.last_applied) == (4, 7)
        assert (expired.expires, expired.now, expired.sequence) == (100, 150, 9)
        assert (too_large.size_bytes, too_large.limit_bytes) == (2000, 1024)
        assert (version.version, version.supported, version.field) == (2, 1, "v")

    @given(value=st.text(st.characters(), max_size=300))
    def test_messages_with_wire_values_are_printable_ascii(self, value: str) -> None:
        """Any string from the wire, lone surrogates included, yields a short ASCII message."""
        for error in (
            InvalidId("device_id", value, "an id"),
            TopicMismatch(field="from", expected="'kiosk'", actual=value, topic=value),
            WrongDevice(
                fleet=value, device=value, expected_fleet="a", expected_device="b", sequence=1
            ),
        ):
            message = str(error)
            assert message.isascii()
            assert message.isprintable()
            assert len(message) < 400


class TestShown:
    def test_short_values_are_quoted_in_full(self) -> None:
        """A short value appears whole, in ASCII repr."""
        assert shown("kiosk+17") == "'kiosk+17'"
        assert shown("\ud800") == "'\\ud800'"

    def test_long_values_are_cut(self) -> None:
        """A megabyte string becomes a readable prefix and a count."""
        text = shown("x" * 1_000_000)
        assert len(text) < 150
        assert text.endswith("more characters)")

    @pytest.mark.parametrize("value", [None, 3, ["a"], {"k": 1}])
    def test_non_strings_are_shown_as_ascii(self, value: object) -> None:
        """Any JSON value is shown in ASCII."""
        assert shown(value).isascii()
