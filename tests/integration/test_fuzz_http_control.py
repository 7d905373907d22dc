"""Fuzzing the control plane's REST API with schemathesis, from its OpenAPI document.

One real control plane (``edgelm control run`` as a subprocess, on SQLite, with its own
Mosquitto and a fleet laid out as ``edgelm provision fleet-init`` does) answers every
operation of ``/api/v1/openapi.json``, with the operator token, and with every check of
``http_fuzz.py``. Nothing it can be asked to do destroys what later cases need: the fleet has
no models, so no rollout starts; devices and jobs the cases create are just more rows.
Afterwards it is still ready, still answers, and its log holds no ``request_failed`` line.

Invalid requests come from the document as the control plane serves it, and each must be
refused; valid ones from the same document with what no generator can make left out (a
cursor the server gave out, signed TUF metadata), and none may be refused with a 400.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from schemathesis import Case, HookContext
from schemathesis.openapi import from_dict

from edgelm_control.api.app import OPERATIONS, VERSION
from edgelm_control.api.openapi import build_openapi
from tests.integration.control.control_process import ControlProcess, write_config
from tests.integration.control.fleet import Fleet, make_fleet, sha256
from tests.integration.http_fuzz import (
    count_case,
    fuzz_config,
    http_call,
    integral_floats_as_ints,
)
from tests.mosquitto import Mosquitto

OPERATOR = "fuzz-operator-token-0123456789"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    """A fleet whose operator token is known when this module loads: schemathesis's auth."""
    made = make_fleet(tmp_path_factory.mktemp("fleet"))
    tokens = {
        "tokens": [{"name": "operator", "sha256": sha256(OPERATOR.encode()), "created_at": 0}]
    }
    (made.control_dir / "tokens.json").write_text(json.dumps(tokens))
    return dataclasses.replace(made, token=OPERATOR)


@pytest.fixture(scope="module")
def control(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlProcess]:
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto")).start()
    try:
        # A heartbeat every 50 ms: the event stream reaches schemathesis's cap of events soon.
        config = write_config(fleet, broker.port, sse_heartbeat_s=0.05)
        process = ControlProcess(config, fleet.root / "control.log")
        try:
            yield process.wait_ready()
        finally:
            process.terminate()
    finally:
        broker.stop(timeout_s=10)
        broker.kill()


def call(control: ControlProcess, path: str) -> tuple[int, Any]:
    status, _, body = http_call(control.url, "GET", path, token=OPERATOR)
    return status, body


DOCUMENT = build_openapi(OPERATIONS, version=VERSION)
# The event stream never ends: schemathesis reads it for a second (heartbeats keep it busy,
# so only its deadline stops the read) and checks what came.
STREAM_READ_S = 1
STREAM = [{"include-path": "/api/v1/events", "request-timeout": STREAM_READ_S}]
AUTH = {"operatorToken": OPERATOR}
#: Their bodies are signed TUF metadata, which no generator makes valid: only invalid
#: requests are sent to them (docs/security.md says so).
SIGNED_UPLOADS = ["pushModel", "publishRoot"]


def valid_requests_document() -> dict[str, Any]:
    """The document, narrowed to requests that are valid: a cursor is one this server gave
    out, which a generator cannot make, so valid requests send none (an empty one)."""
    document = copy.deepcopy(DOCUMENT)
    for operations in document["paths"].values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "cursor":
                    parameter["schema"] = {"const": ""}
    return document


valid = from_dict(
    valid_requests_document(), config=fuzz_config(AUTH, mode="positive", operations=STREAM)
)
invalid = from_dict(
    copy.deepcopy(DOCUMENT), config=fuzz_config(AUTH, mode="negative", operations=STREAM)
)


@valid.hook("map_body")
def map_valid_body(context: HookContext, body: Any) -> Any:
    return integral_floats_as_ints(body)


@invalid.hook("map_body")
def map_invalid_body(context: HookContext, body: Any) -> Any:
    return integral_floats_as_ints(body)


def test_the_control_plane_serves_the_document_fuzzed_here(
    control: ControlProcess, fleet: Fleet
) -> None:
    """/api/v1/openapi.json is the document these tests generate their cases from."""
    status, document = call(control, "/api/v1/openapi.json")
    assert status == 200
    assert document == DOCUMENT


@valid.exclude(operation_id=SIGNED_UPLOADS).parametrize()
def test_valid_requests_answer_as_documented(
    case: Case[Any], control: ControlProcess, fleet: Fleet
) -> None:
    """Devices, models, rollouts, jobs, telemetry, events, the repository, health: no 5xx,
    every answer documented, the token enforced, and no valid request refused with a 400."""
    count_case("control", case)
    case.call_and_validate(base_url=control.url)


@invalid.parametrize()
def test_invalid_requests_are_refused(
    case: Case[Any], control: ControlProcess, fleet: Fleet
) -> None:
    """Every operation with requests the document forbids: each refused, none a 5xx."""
    count_case("control", case)
    case.call_and_validate(base_url=control.url)


def push(control: ControlProcess, content_type: str, body: bytes) -> tuple[int, Any]:
    status, _, answer = http_call(
        control.url,
        "POST",
        "/api/v1/models",
        token=OPERATOR,
        body=body,
        content_type=content_type,
    )
    return status, answer


class TestWhatTheFuzzingFound:
    def test_a_push_whose_type_has_no_boundary_is_the_clients_400(
        self, control: ControlProcess
    ) -> None:
        """multipart/form-data without a boundary made aiohttp raise ValueError: a 500."""
        status, body = push(control, "multipart/form-data", b"--x\r\n")
        assert status == 400, body
        assert body["error"]["code"] == "malformed_targets"
        assert body["error"]["param"] == "content-type"

    def test_a_push_that_breaks_its_boundary_is_the_clients_400(
        self, control: ControlProcess
    ) -> None:
        """A body that does not start with its boundary is refused, not a traceback."""
        status, body = push(control, "multipart/form-data; boundary=abc", b"not multipart")
        assert status == 400, body
        assert body["error"]["code"] == "malformed_targets"

    def test_a_part_header_with_a_control_character_is_the_clients_400(
        self, control: ControlProcess
    ) -> None:
        """A part named with a control character made aiohttp raise InvalidHeader: a 500."""
        body = b'--abc\r\nContent-Disposition: form-data; name="\x01"\r\n\r\nx\r\n--abc--\r\n'
        status, answer = push(control, "multipart/form-data; boundary=abc", body)
        assert status == 400, answer
        assert answer["error"]["code"] == "malformed_targets"


def test_the_control_plane_still_serves_after_the_fuzzing(
    control: ControlProcess, fleet: Fleet
) -> None:
    """After every case: ready, the device list and metrics answer, no request_failed."""
    status, ready = call(control, "/readyz")
    assert status == 200
    assert ready["status"] == "ready"
    status, devices = call(control, "/api/v1/devices")
    assert status == 200
    assert isinstance(devices["data"], list)
    lines = Path(control.log_path).read_text().splitlines()
    failed = [line for line in lines if '"event": "request_failed"' in line]
    assert failed == []  # a 500: each line holds its traceback
    assert control.proc.poll() is None
