"""The control plane's request schemas against the validators they restate, both ways: a value
the OpenAPI document allows passes the route's check, and one it forbids is refused. The
document is read with jsonschema_rs, the validator schemathesis reads it with (ECMA-262
regular expressions, where ``$`` ends the text), so a case here is one the HTTP fuzzing can
send."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jsonschema_rs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgelm_control.api.app import OPERATIONS, VERSION
from edgelm_control.api.openapi import build_openapi
from edgelm_control.api.request_schemas import (
    CANARY,
    DEVICE_ID,
    GROUP_BY,
    HARDWARE_CLASS,
    LABEL_FILTER,
    LABELS,
    MODEL_KEY,
    SPACE,
    WAVES,
)
from edgelm_control.api.telemetry_routes import group_by_keys
from edgelm_control.errors import InvalidRequest
from edgelm_control.rollouts.selection import ByClass, ByLabels
from edgelm_control.rollouts.waves import parse_canary, parse_waves
from edgelm_protocol import InvalidId, check_device_id
from edgelm_protocol.ids import check_model_key
from tests.integration.http_fuzz import impossible_all_ofs


def accepts(check: Callable[[Any], object], value: Any) -> bool:
    try:
        check(value)
    except (InvalidRequest, InvalidId):
        return False
    return True


def label_filter(text: str) -> None:
    """The devices list's ``label`` filter, as ``devices_routes._filter`` reads one."""
    key, sep, value = text.partition("=")
    if not sep:
        raise InvalidRequest("label takes key=value", param="label")
    ByLabels(((key, value),))


def canary(value: Any) -> None:
    """A rollout's ``canary``, as ``parse_rollout_request`` reads it."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InvalidRequest("canary must be a count or a share", param="canary")
    parse_canary(str(value))


def labels(value: dict[str, Any]) -> None:
    """A registration's ``labels``."""
    if value:
        ByLabels(tuple(value.items()))


WHITESPACE = re.sub(r"\\u([0-9a-f]{4})", lambda m: chr(int(m.group(1), 16)), SPACE)
#: Text near the rules' edges: the characters they treat specially, and a few others.
EDGY = st.text(
    alphabet=st.sampled_from(
        "aZ09._-@=,%+ rRestT\x00\x1f\x7f\x9f\u00e9\u0663" + WHITESPACE[:8] + "control"
    ),
    max_size=24,
)
WORDS = st.lists(
    st.sampled_from(["model", "device", "hardware_class", "rest", "10%", "0.5%", "5", "0", ""]),
    max_size=4,
).map(",".join)


def strings(schema: dict[str, Any]) -> st.SearchStrategy[str]:
    """Strings the schema's pattern matches, near misses, and any text."""
    pattern = schema.get("pattern") or schema.get("anyOf", [{}, {}])[1].get("pattern")
    matching = st.from_regex(pattern) if pattern else st.nothing()
    return st.one_of(matching, EDGY, WORDS, st.text(max_size=80))


CASES: list[tuple[str, dict[str, Any], Callable[[Any], object], st.SearchStrategy[Any]]] = [
    ("device id", DEVICE_ID, check_device_id, strings(DEVICE_ID) | st.just("control")),
    ("label filter", LABEL_FILTER["items"], label_filter, strings(LABEL_FILTER["items"])),
    ("hardware class", HARDWARE_CLASS, ByClass, strings(HARDWARE_CLASS)),
    ("model key", MODEL_KEY, check_model_key, strings(MODEL_KEY) | st.just("a..b@1")),
    ("canary", CANARY, canary, strings(CANARY) | st.integers() | st.booleans()),
    ("waves", WAVES, parse_waves, strings(WAVES)),
    ("group_by", GROUP_BY, group_by_keys, strings(GROUP_BY)),
    (
        "labels",
        LABELS,
        labels,
        st.dictionaries(strings(DEVICE_ID), strings(HARDWARE_CLASS) | st.just(""), max_size=3),
    ),
]


class TestSchemasAndValidators:
    @pytest.mark.parametrize(
        ("name", "schema", "check", "values"), CASES, ids=[c[0] for c in CASES]
    )
    @settings(max_examples=400, deadline=None)
    @given(data=st.data())
    def test_the_document_allows_exactly_what_the_route_accepts(
        self,
        name: str,
        schema: dict[str, Any],
        check: Callable[[Any], object],
        values: st.SearchStrategy[Any],
        data: st.DataObject,
    ) -> None:
        """For device ids, labels, classes, model keys, canary, waves and group_by."""
        value = data.draw(values)
        allowed = jsonschema_rs.validator_for(schema).is_valid(value)
        assert allowed == accepts(check, value), f"{name}: {value!r} allowed={allowed}"


class TestWhatTheFuzzingFound:
    def test_no_answer_is_an_all_of_of_closed_objects(self) -> None:
        """A device's detail was Device (closed) and its own fields: no body could match, and
        the first valid GET of a registered device failed its own document."""
        document = build_openapi(OPERATIONS, version=VERSION)
        assert impossible_all_ofs(document, document["components"]["schemas"]) == []
