"""FakeControlPlane: the REST routes ``edgelm fleet`` calls, small and honest, for its tests.

The operator CLI is tested against this fake, which needs no broker, store or rollout engine
(the real control plane, ``control-plane/``, has tests of its own). It is a fake, not a mock:
it serves real HTTP on a real socket, reads the fleet directory's ``control/`` folder as the
real server does (tokens.json, the TUF repository, the online keys), and implements the parts
of the control plane's REST API (docs/control-plane.md) that the CLI's behaviour depends on
for real:

* bearer tokens checked against the sha256 hashes in tokens.json;
* errors in the agent's body shape ``{"error": {"message", "type", "param", "code"}}``;
* ``POST /api/v1/models``: the new targets metadata must verify against the root's targets
  keys and be the current version + 1, and every new blob must match the length and sha256
  the metadata lists; then the blobs are stored under consistent-snapshot names and snapshot
  and timestamp re-signed with the online keys, as the real control plane does;
* ``/repository/metadata/`` served from the repository folder (with ``metadata_overrides``
  to play a tampered server);
* ``GET /api/v1/events``: server-sent events, which the test can drop.

What it does not do is run rollouts: no MQTT, no devices, no engine. A rollout's devices and
waves change only when the test says so (:meth:`set_device_state`,
:meth:`set_rollout_state`), which also publishes the event a real server would.

The response shapes below are what the CLI assumes of the control plane's REST API
(docs/control-plane.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import shutil
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp

from edgelm_protocol.bundle import parse_manifest
from edgelm_protocol.repository.writer import RepositoryWriter
from edgelm_provisioning.sse import ServerSentEvent, encode_event

T = TypeVar("T")
_STOP = object()


class FakeError(Exception):
    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param


def _error(status: int, code: str, message: str, param: str | None = None) -> web.Response:
    body = {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    }
    return web.json_response(body, status=status)


class FakeControlPlane:
    def __init__(self, control_dir: Path) -> None:
        self.control_dir = control_dir
        self.repository_dir = control_dir / "repository"
        tokens = json.loads((control_dir / "tokens.json").read_bytes())["tokens"]
        self.token_hashes = {t["sha256"] for t in tokens}
        # Only the online keys are there: snapshot-0, timestamp-0 (and director.pem, skipped).
        self.writer = RepositoryWriter.open(self.repository_dir, control_dir / "keys")
        held = {role for role, signers in self.writer.signers.items() if signers}
        assert held == {Snapshot.type, Timestamp.type}, held  # never an offline key
        self.devices: dict[str, dict[str, Any]] = {}
        self.rollouts: dict[str, dict[str, Any]] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.telemetry: list[dict[str, Any]] = []
        self.metadata_overrides: dict[str, bytes] = {}
        self.refuse_event_stream = False
        self.requests: list[tuple[str, str]] = []
        self._request_seen = threading.Condition()
        self.uploads: list[dict[str, Any]] = []
        self.subscribed = threading.Event()
        self._subscribers: list[asyncio.Queue[object]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    # --- running in a thread of its own (the CLI under test runs asyncio.run itself) ---------

    def start(self) -> str:
        ready = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            loop.run_until_complete(self._start_site())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup() if self._runner else asyncio.sleep(0))
            loop.close()

        self._thread = threading.Thread(target=serve, name="fake-control-plane", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the fake control plane did not start")
        return self.url

    async def _start_site(self) -> None:
        self._runner = web.AppRunner(self._app(), shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        self.run(self._close_streams)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def run(self, action: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run a coroutine on the fake's loop, from the test's thread."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(action(), self._loop).result(10)

    # --- test hooks ------------------------------------------------------------------------

    def add_device(self, device_id: str, hardware_class: str = "pi5", **labels: str) -> None:
        self.devices[device_id] = {
            "id": device_id,
            "hardware_class": hardware_class,
            "labels": labels,
            "presence": "online",
            "last_seen": int(time.time()),
            "agent_version": "0.1.0",
            "active_model": None,
            "applied_sequence": 0,
        }

    def set_device_state(
        self, rollout_id: str, device_id: str, state: str, reason: str | None = None
    ) -> None:
        async def change() -> None:
            for row in self.rollouts[rollout_id]["devices"]:
                if row["id"] == device_id:
                    row["state"], row["reason"] = state, reason
            await self._publish("device", {"id": device_id, "rollout": rollout_id, "state": state})

        self.run(change)

    def set_rollout_state(
        self,
        rollout_id: str,
        state: str,
        *,
        wave_verdicts: list[str | None] | None = None,
        reason: str | None = None,
    ) -> None:
        async def change() -> None:
            rollout = self.rollouts[rollout_id]
            rollout["state"], rollout["reason"] = state, reason
            for wave, verdict in zip(rollout["waves"], wave_verdicts or [], strict=False):
                wave["verdict"] = verdict
            await self._publish("rollout", {"id": rollout_id, "state": state})

        self.run(change)

    def drop_event_streams(self) -> None:
        self.run(self._close_streams)

    def count(self, method: str, path: str) -> int:
        return sum(1 for r in list(self.requests) if r == (method, path))

    def wait_for_request(self, method: str, path: str, count: int = 1) -> None:
        """Block the test's thread until ``method path`` has been asked ``count`` times."""
        with self._request_seen:
            if not self._request_seen.wait_for(lambda: self.count(method, path) >= count, 10):
                raise TimeoutError(f"{method} {path} was not asked {count} time(s)")

    async def _close_streams(self) -> None:
        for queue in self._subscribers:
            queue.put_nowait(_STOP)

    async def _publish(self, event: str, data: dict[str, Any]) -> None:
        for queue in self._subscribers:
            queue.put_nowait(ServerSentEvent(event, json.dumps(data)))

    # --- the application -------------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=1 << 30)
        r = app.router
        r.add_get("/repository/metadata/{name}", self._metadata)
        r.add_get("/repository/targets/{path:.+}", self._target_file)
        r.add_get("/api/v1/devices", self._devices)
        r.add_get("/api/v1/devices/{id}", self._device)
        r.add_get("/api/v1/models", self._models)
        r.add_post("/api/v1/models", self._push_model)
        r.add_get("/api/v1/rollouts", self._list_rollouts)
        r.add_post("/api/v1/rollouts", self._create_rollout)
        r.add_get("/api/v1/rollouts/{id}", self._rollout)
        r.add_post("/api/v1/rollouts/{id}/{action}", self._rollout_action)
        r.add_post("/api/v1/jobs", self._create_job)
        r.add_get("/api/v1/jobs/{id}", self._job)
        r.add_get("/api/v1/telemetry", self._telemetry)
        r.add_get("/api/v1/events", self._events)
        return app

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        with self._request_seen:
            self.requests.append((request.method, request.path))
            self._request_seen.notify_all()
        if request.path.startswith("/api/"):
            auth = request.headers.get("Authorization", "")
            token = auth.removeprefix("Bearer ")
            if not auth.startswith("Bearer ") or (
                hashlib.sha256(token.encode()).hexdigest() not in self.token_hashes
            ):
                return _error(401, "unauthorized", "a valid bearer token is required")
        try:
            return await handler(request)
        except FakeError as exc:
            return _error(exc.status, exc.code, exc.message, exc.param)

    async def _metadata(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name in self.metadata_overrides:
            return web.Response(body=self.metadata_overrides[name])
        path = self.repository_dir / "metadata" / name
        if "/" in name or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    async def _target_file(self, request: web.Request) -> web.StreamResponse:
        path = (self.repository_dir / "targets" / request.match_info["path"]).resolve()
        if not path.is_relative_to(self.repository_dir.resolve()) or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    # --- devices, models -------------------------------------------------------------------

    async def _devices(self, request: web.Request) -> web.Response:
        rows = list(self.devices.values())
        for label in request.query.getall("label", []):
            key, _, value = label.partition("=")
            rows = [d for d in rows if d["labels"].get(key) == value]
        if "class" in request.query:
            rows = [d for d in rows if d["hardware_class"] == request.query["class"]]
        return web.json_response({"data": rows, "next_cursor": None})

    async def _device(self, request: web.Request) -> web.Response:
        device = self.devices.get(request.match_info["id"])
        if device is None:
            raise FakeError(404, "not_found", f"no device {request.match_info['id']!r}", "id")
        events = [{"kind": "activated", "model": "smollm2@1.0", "ts_ms": 1795344276123}]
        return web.json_response({**device, "events": events, "telemetry": [], "desired": None})

    def _model_rows(self) -> list[dict[str, Any]]:
        rows = []
        for path, info in self.writer.targets().items():
            custom = info.unrecognized_fields.get("custom", {}).get("edgelm", {})
            fields = ("name", "version", "format", "quantization", "context_length")
            rows.append(
                {"path": path, "length": info.length, "sha256": info.hashes["sha256"]}
                | {k: custom.get(k) for k in fields}
            )
        return rows

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": self._model_rows(), "next_cursor": None})

    async def _push_model(self, request: web.Request) -> web.Response:
        reader = await request.multipart()
        first = await reader.next()
        if first is None or getattr(first, "name", None) != "targets":
            raise FakeError(400, "invalid_request", "the first part must be 'targets'", "targets")
        raw = await first.read()  # type: ignore[union-attr]
        try:
            new = Metadata[Targets].from_bytes(bytes(raw))
        except Exception as exc:
            raise FakeError(400, "invalid_request", f"targets is not metadata: {exc}") from exc
        root: Root = self.writer.md[Root.type].signed
        try:
            root.verify_delegate(Targets.type, new.signed_bytes, new.signatures)
        except UnsignedMetadataError as exc:
            raise FakeError(422, "unprocessable", f"targets signature: {exc}", "targets") from exc
        current = self.writer.md[Targets.type].signed
        if new.signed.version != current.version + 1:
            raise FakeError(
                409,
                "conflict",
                f"targets version must be {current.version + 1}, got {new.signed.version}",
                "targets",
            )
        staged = Path(tempfile.mkdtemp(prefix="upload-", dir=self.repository_dir.parent))
        try:
            blobs = await self._receive_blobs(reader, staged)
            added = {p: t for p, t in new.signed.targets.items() if current.targets.get(p) != t}
            if not added:
                raise FakeError(422, "unprocessable", "the new targets add nothing", "targets")
            for path, info in added.items():
                sha = info.hashes["sha256"]
                directory, filename = path.rsplit("/", 1)
                self._place(blobs, sha, info.length, f"{directory}/{sha}.{filename}")
                if filename == "bundle.json":
                    manifest = self.repository_dir / "targets" / directory / f"{sha}.{filename}"
                    for member in parse_manifest(manifest.read_bytes()):
                        self._place(
                            blobs,
                            member.sha256,
                            member.length,
                            f"{directory}/files/{member.sha256}",
                        )
        finally:
            shutil.rmtree(staged)
        self.writer.md[Targets.type] = new
        self.writer.write_signed(Targets.type)
        self.writer.publish(roles=())  # re-signs snapshot and timestamp with the online keys
        self.uploads.append({"targets_version": new.signed.version, "blobs": sorted(blobs)})
        path, info = next(iter(added.items()))
        return web.json_response({"path": path, "length": info.length}, status=201)

    async def _receive_blobs(self, reader: Any, staged: Path) -> dict[str, Path]:
        blobs: dict[str, Path] = {}
        while (part := await reader.next()) is not None:
            digest, out = hashlib.sha256(), staged / f"part-{len(blobs)}"
            with out.open("wb") as f:
                while chunk := await part.read_chunk():
                    digest.update(chunk)
                    f.write(chunk)
            if digest.hexdigest() != part.name:
                raise FakeError(422, "unprocessable", f"blob {part.name} has another sha256")
            blobs[part.name] = out
        return blobs

    def _place(self, blobs: dict[str, Path], sha: str, length: int, relative: str) -> None:
        dest = self.repository_dir / "targets" / relative
        if dest.exists():
            return
        if sha not in blobs or blobs[sha].stat().st_size != length:
            raise FakeError(422, "unprocessable", f"blob {sha} missing or of the wrong length")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(blobs[sha], dest)

    # --- rollouts ---------------------------------------------------------------------------

    def _select(self, selector: dict[str, Any]) -> list[str]:
        devices = self.devices.values()
        if "devices" in selector:
            return sorted(d for d in selector["devices"] if d in self.devices)
        if "labels" in selector:
            want = selector["labels"]
            return sorted(
                d["id"] for d in devices if all(d["labels"].get(k) == v for k, v in want.items())
            )
        if "class" in selector:
            return sorted(d["id"] for d in devices if d["hardware_class"] == selector["class"])
        return sorted(self.devices)

    async def _create_rollout(self, request: web.Request) -> web.Response:
        body = await request.json()
        model = body.get("model")
        known = {f"{t['name']}@{t['version']}" for t in self._model_rows()}
        if model not in known:
            raise FakeError(404, "not_found", f"no model {model!r} in the repository", "model")
        ids = self._select(body["selector"])
        if not ids:
            raise FakeError(422, "unprocessable", "the selector matches no device", "selector")
        waves = _waves(ids, body.get("canary"))
        rollout_id = f"ro-{len(self.rollouts) + 1}"
        self.rollouts[rollout_id] = {
            "id": rollout_id,
            "model": model,
            "state": "running",
            "reason": None,
            "selector": body["selector"],
            "settings": {k: v for k, v in body.items() if k not in ("model", "selector")},
            "created_at": int(time.time()),
            "waves": [
                {"index": i, "devices": w, "verdict": "running" if i == 0 else None, "reason": None}
                for i, w in enumerate(waves)
            ],
            "devices": [
                {"id": d, "wave": i, "state": "pending" if i == 0 else "waiting", "reason": None}
                for i, w in enumerate(waves)
                for d in w
            ],
        }
        return web.json_response(self.rollouts[rollout_id], status=201)

    async def _list_rollouts(self, request: web.Request) -> web.Response:
        rows = [
            {k: r[k] for k in ("id", "model", "state", "created_at")} | {"counts": _counts(r)}
            for r in self.rollouts.values()
            if request.query.get("state") in (None, r["state"])
        ]
        return web.json_response({"data": rows, "next_cursor": None})

    def _get_rollout(self, rollout_id: str) -> dict[str, Any]:
        if rollout_id not in self.rollouts:
            raise FakeError(404, "not_found", f"no rollout {rollout_id!r}", "id")
        return self.rollouts[rollout_id]

    async def _rollout(self, request: web.Request) -> web.Response:
        return web.json_response(self._get_rollout(request.match_info["id"]))

    async def _rollout_action(self, request: web.Request) -> web.Response:
        rollout = self._get_rollout(request.match_info["id"])
        action, state = request.match_info["action"], rollout["state"]
        allowed = {
            "pause": ({"running"}, "paused"),
            "resume": ({"paused", "halted"}, "running"),
            "abort": ({"running", "paused", "halted", "completed"}, "aborted"),
        }
        if action not in allowed:
            raise FakeError(404, "not_found", f"no action {action!r}")
        sources, target = allowed[action]
        if state not in sources:
            raise FakeError(409, "conflict", f"cannot {action} a rollout that is {state}")
        rollout["state"] = target
        if action == "abort":
            for row in rollout["devices"]:
                if row["state"] in ("waiting", "pending", "downloading"):
                    row["state"] = "cancelled"
        await self._publish("rollout", {"id": rollout["id"], "state": target})
        return web.json_response(rollout)

    # --- jobs, telemetry, events -------------------------------------------------------------

    async def _create_job(self, request: web.Request) -> web.Response:
        body = await request.json()
        ids = self._select(body["selector"])
        job_id = f"job-{len(self.jobs) + 1}"
        self.jobs[job_id] = {
            "id": job_id,
            "request": body["request"],
            "created_at": int(time.time()),
            "devices": [
                {"device": d, "state": "queued", "result": None, "error": None} for d in ids
            ],
        }
        return web.json_response(self.jobs[job_id], status=201)

    async def _job(self, request: web.Request) -> web.Response:
        job = self.jobs.get(request.match_info["id"])
        if job is None:
            raise FakeError(404, "not_found", "no such job", "id")
        return web.json_response(job)

    async def _telemetry(self, request: web.Request) -> web.Response:
        rows = self.telemetry
        if "device" in request.query:
            rows = [r for r in rows if r.get("device") == request.query["device"]]
        if "group_by" in request.query:
            keys = request.query["group_by"].split(",")
            groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
            for r in rows:
                groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
            rows = [
                dict(zip(keys, key, strict=True)) | {"count": len(items)}
                for key, items in groups.items()
            ]
        return web.json_response({"data": rows})

    async def _events(self, request: web.Request) -> web.StreamResponse:
        if self.refuse_event_stream:
            return _error(503, "unavailable", "no event stream here")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        queue: asyncio.Queue[object] = asyncio.Queue()
        self._subscribers.append(queue)
        self.subscribed.set()
        try:
            await response.write(b": connected\n\n")
            while (item := await queue.get()) is not _STOP:
                assert isinstance(item, ServerSentEvent)
                await response.write(encode_event(item))
        finally:
            self._subscribers.remove(queue)
        return response


def _counts(rollout: dict[str, Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rollout["devices"]:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    return counts


def _waves(ids: list[str], canary: object) -> list[list[str]]:
    """A canary (a count or a share, at least 1), then the rest; no canary: one wave."""
    if canary is None:
        return [ids]
    text = str(canary)
    size = max(1, math.ceil(len(ids) * float(text[:-1]) / 100)) if text.endswith("%") else int(text)
    return [w for w in (ids[:size], ids[size:]) if w]
