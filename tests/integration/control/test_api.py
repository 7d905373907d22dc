"""The REST API of a running control plane: auth, errors, OpenAPI, devices, jobs, SSE, health.

A real control plane runs in the test's event loop on a free port, with its own Mosquitto and
a SQLite store; simulated devices speak the real protocol to it.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import ClientSession

from edgelm_control.api.app import OPERATIONS
from edgelm_protocol import JobOutcome
from tests.integration.control.conftest import StartControl, until

ROUTES_NEEDING_AUTH = [
    ("GET", "/api/v1/devices"),
    ("GET", "/api/v1/devices/kiosk-1"),
    ("POST", "/api/v1/devices"),
    ("GET", "/api/v1/models"),
    ("POST", "/api/v1/models"),
    ("GET", "/api/v1/rollouts"),
    ("POST", "/api/v1/rollouts"),
    ("GET", "/api/v1/rollouts/ro-1"),
    ("POST", "/api/v1/rollouts/ro-1/pause"),
    ("POST", "/api/v1/rollouts/ro-1/resume"),
    ("POST", "/api/v1/rollouts/ro-1/abort"),
    ("GET", "/api/v1/jobs"),
    ("POST", "/api/v1/jobs"),
    ("GET", "/api/v1/jobs/job-1"),
    ("GET", "/api/v1/telemetry"),
    ("GET", "/api/v1/events"),
    ("GET", "/api/v1/openapi.json"),
    ("GET", "/api/v1/no-such-route"),
]


def assert_error(body: Any, code: str | None = None, param: str | None = None) -> None:
    assert set(body) == {"error"}, body
    assert {"message", "type", "param", "code"} <= set(body["error"]), body
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    if param is not None:
        assert body["error"]["param"] == param, body


class TestAuthentication:
    async def test_every_api_call_needs_a_token(self, start_control: StartControl):
        """Without a token, or with a wrong one, every /api call answers 401 in the error shape."""
        control = await start_control()
        for method, path in ROUTES_NEEDING_AUTH:
            status, body = await control.call(method, path, auth=False)
            assert status == 401, (method, path, status)
            assert_error(body, "invalid_token", "authorization")
            status, body = await control.call(
                method, path, auth=False, headers={"Authorization": "Bearer nope"}
            )
            assert status == 401, (method, path, status)
            assert body["error"]["type"] == "authentication_error"

    async def test_health_metrics_and_the_repository_need_no_token(
        self, start_control: StartControl
    ):
        """Load balancers, Prometheus, devices and mirrors call these without a token."""
        control = await start_control()
        assert (await control.call("GET", "/healthz", auth=False))[0] == 200
        status, ready = await control.call("GET", "/readyz", auth=False)
        assert (status, ready["checks"]) == (200, {"store": "ok", "broker": "ok"})
        status, metrics = await control.call("GET", "/metrics", auth=False)
        assert status == 200
        assert b"edgelm_control_broker_connected 1.0" in metrics
        status, _timestamp = await control.call(
            "GET", "/repository/metadata/timestamp.json", auth=False
        )
        assert status == 200


class TestErrors:
    async def test_bad_requests_get_a_clear_4xx_naming_the_field(self, start_control: StartControl):
        """Malformed bodies, bad fields and unknown ids are 4xx in the JSON error shape."""
        control = await start_control()
        rollout = "/api/v1/rollouts"
        every = {"model": "m@1", "selector": {"all": True}}
        cases: list[tuple[str, str, Any, int, str | None]] = [
            ("POST", rollout, None, 400, "body"),
            ("POST", rollout, [], 400, "body"),
            ("POST", rollout, {"model": "m@1"}, 400, "selector"),
            ("POST", rollout, every | {"model": "NOPE"}, 400, "model"),
            ("POST", rollout, every | {"selector": {"x": 1}}, 400, "selector"),
            ("POST", rollout, every | {"canary": "0"}, 400, "canary"),
            ("POST", rollout, every | {"success_threshold": 2}, 400, "success_threshold"),
            ("POST", rollout, every | {"typo": 1}, 400, "typo"),
            ("POST", rollout, every, 404, "model"),
            ("GET", "/api/v1/rollouts/ro-none", None, 404, "id"),
            ("POST", "/api/v1/rollouts/ro-none/abort", None, 404, "id"),
            ("GET", "/api/v1/rollouts?state=sleeping", None, 400, "state"),
            ("GET", "/api/v1/devices?limit=0", None, 400, "limit"),
            ("GET", "/api/v1/devices?cursor=!!", None, 400, "cursor"),
            ("GET", "/api/v1/devices?presence=maybe", None, 400, "presence"),
            ("GET", "/api/v1/devices/bad%2Bid", None, 400, "id"),
            ("GET", "/api/v1/devices/kiosk-404", None, 404, "id"),
            ("POST", "/api/v1/devices", {"id": "a/b"}, 400, "id"),
            ("POST", "/api/v1/jobs", {"selector": {"all": True}}, 400, "request"),
            ("POST", "/api/v1/jobs", {"request": {}, "selector": {"all": True}, "priority": 500},
             400, "priority"),
            ("POST", "/api/v1/jobs", {"request": {}, "selector": {"all": True}}, 422, "selector"),
            ("GET", "/api/v1/jobs/job-none", None, 404, "id"),
            ("GET", "/api/v1/telemetry?group_by=colour", None, 400, "group_by"),
            ("GET", "/api/v1/telemetry?since=yesterday", None, 400, "since"),
            # With group_by, a bad device, limit or cursor was ignored (and a good device too).
            ("GET", "/api/v1/telemetry?group_by=model&device=a%2Fb", None, 400, "device"),
            ("GET", "/api/v1/telemetry?group_by=model&limit=0", None, 400, "limit"),
            ("GET", "/api/v1/telemetry?group_by=model&cursor=!!", None, 400, "cursor"),
        ]  # fmt: skip
        for method, path, body, expected, param in cases:
            data = None if body is None else json.dumps(body).encode()
            status, answer = await control.call(
                method, path, data=data, headers={"Content-Type": "application/json"}
            )
            assert status == expected, (method, path, body, status, answer)
            assert_error(answer, param=param)

    async def test_a_body_that_is_not_json_or_too_large_is_refused(
        self, start_control: StartControl
    ):
        """Broken JSON is a 400; a body over max_body_bytes a 413, before it is parsed."""
        control = await start_control(max_body_bytes=1024)
        status, body = await control.call("POST", "/api/v1/rollouts", data=b"{nope")
        assert status == 400
        assert_error(body, "invalid_request", "body")
        status, body = await control.call(
            "POST", "/api/v1/rollouts", data=b"[" + b" " * 4096 + b"]"
        )
        assert status == 413
        assert_error(body, "payload_too_large")


class TestOpenApi:
    async def test_the_document_lists_every_route_with_its_schemas(
        self, start_control: StartControl
    ):
        """Every route the server answers is in the OpenAPI 3.1 document, with responses,
        and every request body and $ref it names resolves."""
        control = await start_control()
        status, document = await control.call("GET", "/api/v1/openapi.json")
        assert status == 200
        assert document["openapi"] == "3.1.0"
        app = control.service.app
        assert app is not None
        app_routes = {
            (route.method, route.resource.canonical)
            for route in app.router.routes()
            if route.method != "HEAD" and route.resource is not None
        }
        documented = {
            (method.upper(), path)
            for path, operations in document["paths"].items()
            for method in operations
        }
        assert app_routes == documented
        schemas = document["components"]["schemas"]
        refs: list[str] = []

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                if "$ref" in node:
                    refs.append(node["$ref"])
                for value in node.values():
                    walk(value)
            elif isinstance(node, list):
                for value in node:
                    walk(value)

        walk(document)
        assert refs
        assert all(r.removeprefix("#/components/schemas/") in schemas for r in refs)
        for path, operations in document["paths"].items():
            for method, operation in operations.items():
                assert operation["responses"], (method, path)
                if method == "post" and not path.endswith(("/pause", "/resume", "/abort")):
                    assert "requestBody" in operation, (method, path)

    def test_operations_have_unique_ids(self):
        """Each operation has its own id (clients generate method names from them)."""
        ids = [op.operation_id for op in OPERATIONS]
        assert len(ids) == len(set(ids))


class TestDevicesApi:
    async def test_devices_appear_when_they_report_and_list_with_filters(
        self, start_control: StartControl
    ):
        """Reporting devices are listed with presence, class, labels and their model."""
        control = await start_control()
        await control.device("kiosk-1", labels={"site": "berlin"})
        await control.device("kiosk-2", hardware_class="jetson")
        status, body = await control.call(
            "POST", "/api/v1/devices", json={"id": "kiosk-3", "hardware_class": "x86"}
        )
        assert status == 201
        assert body["presence"] == "unknown"

        async def listed() -> bool:
            _, page = await control.call("GET", "/api/v1/devices?presence=online")
            return len(page["data"]) == 2

        await until(listed)
        _, berlin = await control.call("GET", "/api/v1/devices?label=site=berlin")
        assert [d["id"] for d in berlin["data"]] == ["kiosk-1"]
        _, first = await control.call("GET", "/api/v1/devices?limit=2")
        _, rest = await control.call(
            "GET", f"/api/v1/devices?limit=2&cursor={first['next_cursor']}"
        )
        assert [d["id"] for d in first["data"] + rest["data"]] == ["kiosk-1", "kiosk-2", "kiosk-3"]
        assert rest["next_cursor"] is None
        status, detail = await control.call("GET", "/api/v1/devices/kiosk-2")
        assert status == 200
        assert detail["hardware_class"] == "jetson"
        assert detail["reported_state"] is not None


class TestJobsApi:
    async def test_a_job_reaches_each_selected_device_and_collects_results(
        self, start_control: StartControl
    ):
        """A job goes to every selected device; their results (with NUL) come back per device."""
        control = await start_control()
        one = await control.device("kiosk-1")
        two = await control.device("kiosk-2")
        await _until_devices(control, 2)
        status, job = await control.call(
            "POST",
            "/api/v1/jobs",
            json={
                "request": {"messages": [{"role": "user", "content": "hi"}]},
                "selector": {"all": True},
                "priority": 5,
            },
        )
        assert status == 201, job
        await until(lambda: len(one.jobs) == 1 and len(two.jobs) == 1)
        assert one.jobs[0][1].priority == 5

        async def finished() -> bool:
            _, found = await control.call("GET", f"/api/v1/jobs/{job['id']}")
            return bool(found["counts"] == {"succeeded": 2})

        await until(finished)
        _, found = await control.call("GET", f"/api/v1/jobs/{job['id']}")
        results = {d["device"]: d["result"] for d in found["devices"]}
        assert results["kiosk-1"] == {"choices": [{"text": "hello from kiosk-1\u0000"}]}
        await until(lambda: not one.outbox and not two.outbox)
        assert str(JobOutcome.SUCCEEDED) == "succeeded"


async def _until_devices(control: Any, count: int) -> None:
    async def seen() -> bool:
        _, page = await control.call("GET", "/api/v1/devices?presence=online")
        return len(page["data"]) >= count

    await until(seen)


class TestEventStream:
    async def test_the_stream_carries_device_changes(self, start_control: StartControl):
        """An SSE client hears a device come online as an ``event: device`` line."""
        control = await start_control()
        received: list[str] = []
        async with (
            ClientSession() as session,
            session.get(control.url + "/api/v1/events", headers=control.auth()) as response,
        ):
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            await control.device("kiosk-9")

            async def read() -> None:
                async for line in response.content:
                    received.append(line.decode())
                    if line.startswith(b"data:") and b"kiosk-9" in line:
                        return

            await asyncio.wait_for(read(), 60)
        assert "event: device\n" in received
        assert any("kiosk-9" in line for line in received)


@pytest.mark.parametrize("path", ["/api/v1/devices/%ED%A0%80"])
class TestUrlText:
    async def test_a_path_that_is_not_utf8_is_a_400(self, start_control: StartControl, path: str):
        """Bytes that are not UTF-8 in the path are refused before any handler runs."""
        control = await start_control()
        status, body = await control.call("GET", path)
        assert status in (400, 404)
        assert_error(body)
