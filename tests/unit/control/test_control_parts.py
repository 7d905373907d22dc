"""Small pure parts: remote job rows, the SSE hub, paging cursors, tokens, the OpenAPI
document, job requests and the error body."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgelm_control.api.app import OPERATIONS
from edgelm_control.api.auth import read_tokens_file, token_hash
from edgelm_control.api.errors import error_response
from edgelm_control.api.openapi import build_openapi
from edgelm_control.api.requests import encode_cursor
from edgelm_control.errors import ConfigError, InvalidRequest, NotAuthorized, PayloadTooLarge
from edgelm_control.hub import Ended, FleetHub, Lagging
from edgelm_control.jobs.service import parse_job_request
from edgelm_control.jobs.states import (
    FINAL,
    TRANSITIONS,
    IllegalJobTransition,
    JobDeviceEvent,
    JobDeviceState,
    next_job_state,
)
from edgelm_control.rollouts.errors import EmptySelection, InvalidSelector
from edgelm_control.rollouts.selection import AllDevices
from edgelm_protocol import JobOutcome

J = JobDeviceState


class TestJobStates:
    def test_a_queued_row_is_sent_then_finished_by_its_result(self):
        """queued → sent on PUBACK; a result moves it to the outcome it names."""
        assert next_job_state(J.QUEUED, JobDeviceEvent.SENT) is J.SENT
        for outcome in JobOutcome:
            assert next_job_state(J.SENT, JobDeviceEvent.RESULT, outcome) is J(str(outcome))
            assert next_job_state(J.QUEUED, JobDeviceEvent.RESULT, outcome) is J(str(outcome))

    @pytest.mark.parametrize(
        ("state", "event"),
        [
            (s, e)
            for s, e in itertools.product(JobDeviceState, JobDeviceEvent)
            if (s, e) not in TRANSITIONS
        ],
    )
    def test_every_other_pair_is_refused(self, state: JobDeviceState, event: JobDeviceEvent):
        """A final row takes nothing, and a sent row is not sent again."""
        with pytest.raises(IllegalJobTransition):
            next_job_state(state, event, JobOutcome.SUCCEEDED)

    def test_final_states_are_the_outcomes(self):
        """The final states are exactly the device's job outcomes."""
        assert {str(s) for s in FINAL} == {str(o) for o in JobOutcome}


class TestJobRequest:
    def test_a_job_is_checked_with_the_protocol_rules(self):
        """The request body becomes a RemoteJob with the defaults the device uses."""
        job = parse_job_request({"request": {"prompt": "hi"}, "selector": {"devices": ["d1"]}})
        assert (job.body.priority, job.body.max_attempts, job.body.wait_for_model) == (0, 3, False)

    @pytest.mark.parametrize(
        ("body", "param"),
        [
            ({"selector": {"all": True}}, "request"),
            ({"request": [], "selector": {"all": True}}, "request"),
            ({"request": {}, "selector": {"all": True}, "max_attempts": 0}, "max_attempts"),
            ({"request": {}, "selector": {"all": True}, "ttl_s": -1}, "ttl_s"),
            ({"request": {}, "selector": {"all": True}, "shout": True}, "shout"),
        ],
    )
    def test_a_bad_job_names_its_field(self, body: dict[str, object], param: str):
        """Each mistake is a 400 with ``param`` naming the field."""
        with pytest.raises(InvalidRequest) as caught:
            parse_job_request(body)
        assert caught.value.param == param

    def test_a_job_too_large_for_the_wire_is_a_413(self):
        """A request over the job type's payload limit is refused before it is stored."""
        with pytest.raises(PayloadTooLarge):
            parse_job_request({"request": {"prompt": "x" * 300_000}, "selector": {"all": True}})

    def test_a_bad_selector_is_the_selectors_error(self):
        """Selectors are checked by the rollouts' selector rules."""
        with pytest.raises(InvalidSelector):
            parse_job_request({"request": {}, "selector": {"all": False}})


class TestHub:
    async def test_every_subscriber_gets_every_notice(self):
        """Two subscribers each see a published notice; quiet time gives None."""
        hub = FleetHub()
        async with hub.subscribe() as first, hub.subscribe() as second:
            hub.publish("device", {"id": "d1"})
            assert (await first.next(1)).data == {"id": "d1"}  # type: ignore[union-attr]
            assert (await second.next(1)).kind == "device"  # type: ignore[union-attr]
            assert await first.next(0.01) is None
        assert hub.subscribers == 0

    async def test_a_subscriber_that_falls_behind_is_cut_off(self):
        """Past its queue, a slow subscriber gets Lagging instead of unbounded memory."""
        hub = FleetHub(queue_max=2)
        async with hub.subscribe() as slow:
            for i in range(5):
                hub.publish("job", {"n": i})
            assert slow.lagging
            assert (await slow.next(1)) is not None  # what fitted before the cut is kept
            with pytest.raises(Lagging):
                await slow.next(1)

    async def test_closing_the_hub_ends_every_stream(self):
        """At shutdown open streams end at once (``Ended``), after what was queued."""
        hub = FleetHub()
        async with hub.subscribe() as open_stream:
            hub.publish("device", {"id": "d1"})
            hub.close()
            assert (await open_stream.next(1)) is not None
            with pytest.raises(Ended):
                await open_stream.next(1)
            with pytest.raises(Ended):
                await hub.subscribe().next(1)

    def test_only_the_three_kinds_are_published(self):
        """device, rollout and job are the SSE event names; anything else is a bug."""
        with pytest.raises(ValueError, match="kind"):
            FleetHub().publish("weather", {})


class TestCursors:
    @given(st.lists(st.one_of(st.integers(0, 2**53), st.text(max_size=64)), max_size=3))
    def test_a_cursor_is_url_safe(self, key: list[object]):
        """Cursors travel in query strings: base64url without padding."""
        cursor = encode_cursor(key)
        assert "=" not in cursor
        assert "+" not in cursor
        assert "/" not in cursor


class TestTokens:
    def test_the_tokens_file_is_read_as_provisioning_writes_it(self, tmp_path: Path):
        """Entries come back with their hashes; a token's hash is its sha256 hex."""
        path = tmp_path / "tokens.json"
        path.write_text(
            json.dumps(
                {"tokens": [{"name": "operator", "sha256": token_hash("t"), "created_at": 1}]}
            )
        )
        (entry,) = read_tokens_file(path)
        assert entry.sha256 == "e3b98a4da31a127d4bde6e43033f66ba274cab0eb7eb1c70ec41402bf6273dd8"

    @pytest.mark.parametrize(
        "content",
        ["", "[]", '{"tokens": {}}', '{"tokens": [{"name": "a", "sha256": "short"}]}',
         '{"tokens": [{"name": "a/b", "sha256": "' + "0" * 64 + '"}]}'],
    )  # fmt: skip
    def test_a_bad_tokens_file_stops_the_start_with_the_reason(self, tmp_path: Path, content: str):
        """A broken tokens file is a ConfigError naming the file."""
        path = tmp_path / "tokens.json"
        path.write_text(content)
        with pytest.raises(ConfigError, match="tokens"):
            read_tokens_file(path)

    def test_a_missing_tokens_file_says_who_writes_it(self, tmp_path: Path):
        """The error points at fleet-init."""
        with pytest.raises(ConfigError, match="fleet-init"):
            read_tokens_file(tmp_path / "nope.json")


class TestOpenApiDocument:
    def test_every_operation_is_documented_once_with_auth_where_needed(self):
        """Each operation is a path and method of the document; non-public ones list 401."""
        document = build_openapi(OPERATIONS, version="1")
        for op in OPERATIONS:
            entry = document["paths"][op.path][op.method.lower()]
            assert entry["operationId"] == op.operation_id
            assert ("401" in entry["responses"]) != op.public
            assert (entry.get("security") == []) == op.public
        assert document["openapi"] == "3.1.0"
        json.dumps(document)  # plain JSON throughout


class TestErrorBody:
    def test_errors_keep_the_agents_shape(self):
        """status from the class, type from the status, the param and code as attributes."""
        response = error_response(NotAuthorized("no", param="authorization"))
        assert response.status == 401
        assert "Bearer" in response.headers["WWW-Authenticate"]
        assert json.loads(response.text or "") == {
            "error": {
                "message": "no",
                "type": "authentication_error",
                "param": "authorization",
                "code": "invalid_token",
            }
        }
        empty = error_response(EmptySelection(AllDevices(), 0))
        assert empty.status == 422
        assert json.loads(empty.text or "")["error"]["type"] == "invalid_request_error"
