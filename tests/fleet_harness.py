"""The fleet's side of the wire, for the agent's sync tests: a TUF repository served over real
HTTP, a director that signs desired states, enrollment bundles, and a counterpart on a real
Mosquitto that speaks the protocol with ``edgelm_protocol`` (the control plane's part).

Everything here is real except who is on the other end of the broker: the agent under test
runs as a subprocess on the tiny GGUF, and this counterpart lets a test place each message, a
forged one included, exactly where it needs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgelm_protocol import (
    Ack,
    DesiredDocument,
    DesiredState,
    Envelope,
    Event,
    JobResult,
    RemoteJob,
    TargetRef,
    Telemetry,
    decode,
    encode,
    new_envelope,
    sign_desired,
)
from edgelm_protocol.mqtt import ConnectionInfo, MqttClient, MqttError, MqttSettings
from edgelm_protocol.repository.writer import RepositoryWriter
from edgelm_protocol.topics import Channel, Topic
from tests.agent_process import REPO, TINY_GGUF, AgentProcess, free_port

FLEET = "acme"


def custom(name: str, version: str, **overrides: Any) -> dict[str, Any]:
    return {
        "edgelm": {
            "name": name,
            "version": version,
            "format": "gguf",
            "backend": "llama.cpp",
            "context_length": 512,
            "chat_template": None,
            "quantization": "F32",
            "min_ram_bytes": 1,
            "sampling": {},
            "health_check": {},
            **overrides,
        }
    }


@dataclass(frozen=True)
class Model:
    name: str
    version: str
    path: str
    length: int
    sha256: str

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def target(self) -> TargetRef:
        return TargetRef(path=self.path, length=self.length, sha256=self.sha256)


class Repository:
    """The fleet's TUF repository in a folder, served by tests/static_server.py."""

    def __init__(self, workdir: Path) -> None:
        self.root = workdir / "repo"
        self.writer = RepositoryWriter.create(self.root, workdir / "repo-keys")
        self.port = free_port()
        self._server: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, name: str, version: str, source: Path = TINY_GGUF, **overrides: Any) -> Model:
        path = f"models/{name}/{version}/model.gguf"
        self.writer.add_target(path, source, custom(name, version, **overrides), link=False)
        self.writer.publish()
        data = source.read_bytes()
        return Model(name, version, path, len(data), hashlib.sha256(data).hexdigest())

    def root_json(self) -> dict[str, Any]:
        return json.loads(self.writer.root_bytes())  # type: ignore[no-any-return]

    def serve(self, *, bytes_per_s: int | None = None, stall_after: int | None = None) -> None:
        self.stop()
        args = [sys.executable, "-m", "tests.static_server", str(self.root), str(self.port)]
        if bytes_per_s is not None:
            args += ["--bytes-per-s", str(bytes_per_s)]
        if stall_after is not None:
            args += ["--stall-after", str(stall_after)]
        self._server = subprocess.Popen(args, cwd=REPO)
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            assert self._server.poll() is None, "the static server died"
            assert time.monotonic() < deadline, "the static server never listened"
            time.sleep(0.05)

    def stop(self) -> None:
        if self._server is not None and self._server.poll() is None:
            self._server.terminate()
            try:
                self._server.wait(timeout=10)
            except subprocess.TimeoutExpired:  # a stalled response it will not give up
                self._server.kill()
                self._server.wait(timeout=10)
        self._server = None


class Director:
    """Signs desired states as the control plane's director key does."""

    def __init__(self, key: Ed25519PrivateKey | None = None) -> None:
        self.key = key or Ed25519PrivateKey.generate()
        self.sequences: dict[str, int] = {}

    def public_pem(self) -> str:
        return (
            self.key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )

    def sign(
        self,
        device: str,
        target: TargetRef | None,  # None: a release
        *,
        sequence: int | None = None,
        rollout: str | None = "ro-test",
        expires_in_s: int = 3600,
        fleet: str = FLEET,
    ) -> DesiredDocument:
        if sequence is None:
            sequence = self.sequences.get(device, 0) + 1
        self.sequences[device] = max(sequence, self.sequences.get(device, 0))
        now = int(time.time())
        expires = now + expires_in_s
        state = DesiredState(
            fleet=fleet,
            device=device,
            sequence=sequence,
            issued_at=min(now - 5, expires - 60),  # an expired one was issued before it expired
            expires=expires,
            rollout=rollout,
            target=target,
        )
        return DesiredDocument.from_json(sign_desired(state, self.key))


def bundle(
    path: Path,
    device: str,
    repository: Repository,
    director: Director,
    broker_port: int,
    **fields: Any,
) -> Path:
    data = {
        "format": "edgelm-enrollment/1",
        "fleet": FLEET,
        "device_id": device,
        "hardware_class": "x86",
        "labels": {"site": "test"},
        "broker": {"url": f"mqtt://127.0.0.1:{broker_port}", "username": device, "password": "x"},
        "control_url": "http://127.0.0.1:1",
        "repository_url": repository.url,
        "root": repository.root_json(),
        "director_keys": [director.public_pem()],
        "issued_at": int(time.time()),
        **fields,
    }
    path.write_text(json.dumps(data))
    path.chmod(0o600)
    return path


def enroll(state_dir: Path, bundle_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *(sys.executable, "-m", "edgelm_cli", "agent", "enroll", str(bundle_path)),
            *("--state-dir", str(state_dir), "--json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO,
    )


@dataclass
class Received:
    topic: Topic
    envelope: Envelope


@dataclass
class Counterpart:
    """The control plane's end of the broker, as test code."""

    client: MqttClient
    received: list[Received] = field(default_factory=list)
    auto_ack: bool = True
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def topic(self, device: str, channel: Channel) -> str:
        return Topic.for_device(FLEET, device, channel).value

    async def send(self, device: str, channel: Channel, body: Any, *, retain: bool = False) -> str:
        envelope = new_envelope(body, sender="control", ts_ms=int(time.time() * 1000))
        await self.client.publish(self.topic(device, channel), encode(envelope), retain=retain)
        return envelope.id

    async def send_raw(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        await self.client.publish(topic, payload, retain=retain)

    async def desired(self, device: str, document: DesiredDocument) -> None:
        await self.send(device, Channel.DESIRED, document, retain=True)

    async def job(self, device: str, request: dict[str, Any], **fields: Any) -> str:
        return await self.send(device, Channel.JOBS, RemoteJob(request=request, **fields))

    async def ack(self, device: str, ids: list[str]) -> None:
        await self.send(device, Channel.ACK, Ack(ids=tuple(ids)))

    def of(self, device: str, kind: str) -> list[Envelope]:
        return [
            r.envelope
            for r in self.received
            if r.topic.device == device and r.envelope.type.value == kind
        ]

    def events(self, device: str) -> list[Event]:
        return [e.body for e in self.of(device, "event") if isinstance(e.body, Event)]

    def results(self, device: str, job_id: str | None = None) -> list[tuple[str, JobResult]]:
        """(envelope id, result) of each job result received, for ``job_id`` if given."""
        return [
            (e.id, e.body)
            for e in self.of(device, "job_result")
            if isinstance(e.body, JobResult) and job_id in (None, e.body.job_id)
        ]

    def telemetry(self, device: str) -> list[Telemetry]:
        return [e.body for e in self.of(device, "telemetry") if isinstance(e.body, Telemetry)]

    async def wait_for(
        self, predicate: Callable[[], Any], what: str, timeout_s: float = 120
    ) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            value = predicate()
            if value:
                return value
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), 0.2)
            self._arrived.clear()

    async def _pump(self) -> None:
        async for message in self.client.messages():
            try:
                topic = Topic.parse(message.topic)
                envelope = decode(topic, message.payload)
            except Exception:  # a test may look at refused traffic in the broker's logs
                self.client.ack(message)
                continue
            self.received.append(Received(topic, envelope))
            self.client.ack(message)
            if self.auto_ack and envelope.type.value in ("event", "job_result"):
                with contextlib.suppress(MqttError):  # the broker went away: it is resent
                    await self.ack(topic.device or "", [envelope.id])
            self._arrived.set()


@contextlib.asynccontextmanager
async def counterpart(broker_port: int, *, auto_ack: bool = True) -> AsyncIterator[Counterpart]:
    settings = MqttSettings(
        host="127.0.0.1", port=broker_port, client_id=f"control-{FLEET}-test", clean_start=True
    )

    async def subscribe(info: ConnectionInfo) -> None:  # again after a broker restart
        await client.subscribe([(f"edgelm/v1/{FLEET}/dev/+/{c}", 1) for c in DEVICE_CHANNELS])

    client = MqttClient(settings, on_connect=subscribe)
    await client.start()
    await client.wait_connected()
    side = Counterpart(client, auto_ack=auto_ack)
    pump = asyncio.create_task(side._pump())
    try:
        yield side
    finally:
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(pump, 30)
        await asyncio.wait_for(client.stop(), 60)


DEVICE_CHANNELS = ("presence", "state", "telemetry", "events")


def enrolled_agent(
    workdir: Path,
    device: str,
    repository: Repository,
    director: Director,
    broker_port: int,
    *,
    env: dict[str, str] | None = None,
    ready: bool = False,
) -> AgentProcess:
    """An agent enrolled in the fleet, started without a model of its own."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = bundle(workdir / "bundle.json", device, repository, director, broker_port)
    enrolled = enroll(workdir / "state", path)
    assert enrolled.returncode == 0, enrolled.stderr
    agent = AgentProcess(
        workdir,
        model=None,
        env={"EDGELM_TELEMETRY_INTERVAL_S": "1", "EDGELM_SYNC_ACK_TIMEOUT_S": "2", **(env or {})},
    )
    return agent.wait_ready() if ready else agent.wait_alive()


def cleanup(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
