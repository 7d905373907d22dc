"""Query integers and cursors stop at the databases' BIGINT: a bigger number is the caller's
mistake (a 400 naming the parameter), never an OverflowError from the driver (a 500)."""

from __future__ import annotations

import base64
import json

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from edgelm_control.api.requests import decode_cursor, encode_cursor, int_query
from edgelm_control.errors import InvalidRequest


def request(query: str) -> web.Request:
    return make_mocked_request("GET", f"/api/v1/telemetry?{query}")


@pytest.mark.parametrize("value", [str(2**63), str(-(2**63) - 1), "9" * 5000, str(1 << 64)])
def test_an_integer_beyond_64_bits_is_refused_naming_the_parameter(value: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        int_query(request(f"since={value}"), "since")
    assert caught.value.param == "since"
    assert len(str(caught.value)) < 300  # the message does not echo 5,000 digits


def test_a_double_minus_is_not_a_number() -> None:
    with pytest.raises(InvalidRequest) as caught:
        int_query(request("since=--5"), "since")
    assert caught.value.param == "since"


@pytest.mark.parametrize(
    "value", [0, 2**63 - 1, -(2**63), "0000000000000000000000000000000000000000042"]
)
def test_the_edges_of_the_range_are_taken(value: int | str) -> None:
    assert int_query(request(f"since={value}"), "since") == int(value)


def test_a_cursor_with_an_integer_beyond_64_bits_is_refused() -> None:
    forged = base64.urlsafe_b64encode(json.dumps([2**70, "d"]).encode()).decode().rstrip("=")
    with pytest.raises(InvalidRequest) as caught:
        decode_cursor(request(f"cursor={forged}"), int, str)
    assert caught.value.param == "cursor"
    honest = encode_cursor([2**63 - 1, "d"])
    assert decode_cursor(request(f"cursor={honest}"), int, str) == [2**63 - 1, "d"]
