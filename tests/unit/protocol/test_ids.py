"""Fleet, device, message and model identifiers: a closed alphabet, matched in full."""

from __future__ import annotations

import pytest
from hypothesis import given

from edgelm_protocol.errors import InvalidId
from edgelm_protocol.ids import (
    check_device_id,
    check_fleet_id,
    check_message_id,
    check_model_key,
    check_model_name,
    check_model_version,
    check_rollout_id,
    check_sender,
    check_share_group,
    new_message_id,
)
from tests.unit.protocol.strategies import bad_ids, ids, message_ids

ID_CHECKS = [check_fleet_id, check_device_id, check_rollout_id, check_share_group, check_sender]


class TestIds:
    @given(value=ids)
    def test_valid_ids_are_returned_unchanged(self, value: str) -> None:
        """An id of the documented pattern passes every id check as it is."""
        for check in ID_CHECKS:
            assert check(value) == value

    @given(value=bad_ids())
    def test_wildcards_separators_and_control_characters_are_refused(self, value: str) -> None:
        """+, #, /, $, NUL, whitespace or any control character anywhere makes an id invalid."""
        for check in ID_CHECKS:
            with pytest.raises(InvalidId) as caught:
                check(value)
            assert caught.value.value == value

    @pytest.mark.parametrize(
        "value",
        ["", "-kiosk", ".hidden", "_x", "a" * 65, "kiosk\n", "ki\x00osk", "é", "+", "#", "$SYS"],
    )
    def test_edge_cases_are_refused(self, value: str) -> None:
        """Empty, too long, a leading punctuation mark, a trailing newline or non-ASCII fail."""
        with pytest.raises(InvalidId) as caught:
            check_device_id(value)
        assert caught.value.kind == "device_id"

    @pytest.mark.parametrize("value", [None, 17, b"kiosk", ["kiosk"]])
    def test_non_strings_are_refused(self, value: object) -> None:
        """Only a str can be an id."""
        with pytest.raises(InvalidId):
            check_fleet_id(value)

    def test_longest_id_is_accepted(self) -> None:
        """64 characters is the limit, inclusive."""
        assert check_device_id("k" * 64) == "k" * 64

    def test_control_is_reserved(self) -> None:
        """No device may be called control, the control plane's sender name."""
        with pytest.raises(InvalidId) as caught:
            check_device_id("control")
        assert "reserved" in caught.value.expected
        assert check_sender("control") == "control"
        assert check_fleet_id("control") == "control"


class TestMessageIds:
    def test_fresh_ids_are_uuid4_hex(self) -> None:
        """new_message_id gives 32 lower-case hex characters, different each time."""
        first, second = new_message_id(), new_message_id()
        assert check_message_id(first) == first
        assert first != second

    @given(value=message_ids)
    def test_lower_case_hex_is_accepted(self, value: str) -> None:
        """Any 32 lower-case hex characters form a message id."""
        assert check_message_id(value) == value

    @pytest.mark.parametrize(
        "value",
        ["7F0C9A3E5B2D4C1A9E8F7A6B5C4D3E2F", "7f0c9a3e", "7f0c9a3e-5b2d-4c1a-9e8f-7a6b5c4d3e2f"],
    )
    def test_other_forms_are_refused(self, value: str) -> None:
        """Upper case, short ids and dashed UUIDs are not message ids."""
        with pytest.raises(InvalidId) as caught:
            check_message_id(value)
        assert caught.value.kind == "message_id"


class TestModelNames:
    @pytest.mark.parametrize("name", ["smollm2", "gemma-3.270m", "a_b"])
    def test_registry_names_are_accepted(self, name: str) -> None:
        """Names the agent's registry accepts are accepted here."""
        assert check_model_name(name) == name

    @pytest.mark.parametrize("name", ["SmolLM2", "a..b", "../x", "a/b", "a@b", ""])
    def test_other_names_are_refused(self, name: str) -> None:
        """Upper case, '..', slashes and '@' are refused, as by the registry."""
        with pytest.raises(InvalidId):
            check_model_name(name)

    def test_versions_allow_plus(self) -> None:
        """A semver build suffix is a valid version; '..' is not."""
        assert check_model_version("1.0.0+q4") == "1.0.0+q4"
        with pytest.raises(InvalidId):
            check_model_version("1..0")

    @pytest.mark.parametrize("key", ["smollm2", "smollm2@", "@1.0", "a@1@2", "A@1.0"])
    def test_model_key_needs_one_at_between_valid_parts(self, key: str) -> None:
        """name@version has exactly one '@' and a valid name and version around it."""
        with pytest.raises(InvalidId):
            check_model_key(key)
        assert check_model_key("smollm2@1.0") == "smollm2@1.0"
