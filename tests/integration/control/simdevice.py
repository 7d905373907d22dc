"""Simulated devices: test code that speaks the real protocol over MQTT, as an agent would.

A :class:`SimDevice` connects with its device id as client id (persistent session, a will of
``offline``), publishes its presence and state retained, verifies every desired state with
:func:`edgelm_protocol.verify_desired` against the fleet's director key, and reports what it
does as events, scripted by its :class:`Behaviour`. Events and job results stay in its outbox
until the control plane's ``ack`` names them, and are sent again until then, exactly as the
delivery rules say. It downloads nothing: what the control plane must get right is what the
device reports, and the agent's own tests cover installing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from edgelm_protocol import (
    Ack,
    Channel,
    DesiredState,
    DesiredStateRefused,
    DirectorKeys,
    Envelope,
    Event,
    EventKind,
    Health,
    JobOutcome,
    JobResult,
    MessageRefused,
    ModelRef,
    Percentiles,
    Presence,
    PresenceStatus,
    Progress,
    RemoteJob,
    ReportedState,
    Telemetry,
    Topic,
    decode,
    encode,
    new_envelope,
    verify_desired,
)
from edgelm_protocol.desired import DesiredDocument
from edgelm_protocol.mqtt import ConnectionInfo, MqttClient, MqttError, MqttSettings, MqttWill

SUCCEED = "succeed"
FAIL_INSTALL = "fail_install"
FAIL_ACTIVATION = "fail_activation"
STOP_AT_DOWNLOAD = "stop_at_download"
STOP_AT_INSTALLED = "stop_at_installed"
SILENT = "silent"


@dataclass
class Behaviour:
    """What the device does with a desired state for a new model."""

    outcome: str = SUCCEED
    tokens_per_s: float | None = 50.0
    ttft_ms: float | None = 100.0
    answer_jobs: bool = True


def model_of(path: str, sha256: str) -> ModelRef:
    _, name, version, _ = path.split("/")
    return ModelRef(name=name, version=version, sha256=sha256)


@dataclass
class SimDevice:
    fleet: str
    device_id: str
    port: int
    keys: DirectorKeys
    hardware_class: str = "pi5"
    labels: dict[str, str] = field(default_factory=dict)
    active: ModelRef | None = None
    behaviour: Behaviour = field(default_factory=Behaviour)
    resend_s: float = 0.3

    def __post_init__(self) -> None:
        self.previous: ModelRef | None = None
        self.installed: list[ModelRef] = [] if self.active is None else [self.active]
        self.applied_sequence = 0
        self.seq = 0
        self.outbox: dict[str, tuple[Topic, bytes]] = {}
        self.sent: dict[str, bytes] = {}  # every durable message ever emitted, by id
        self.acks: Counter[str] = Counter()
        self.desired: list[DesiredState] = []
        #: The rollout whose desired state made ``active`` active (a release undoes only it).
        self.switched_by: str | None = None
        self.refused: list[str] = []
        self.jobs: list[tuple[str, RemoteJob]] = []
        self.client: MqttClient | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def topic(self, channel: Channel) -> Topic:
        return Topic.for_device(self.fleet, self.device_id, channel)

    def payload(self, body: Any) -> bytes:
        """The envelope bytes this device would send for ``body`` (a fresh message id)."""
        return encode(new_envelope(body, sender=self.device_id, ts_ms=int(time.time() * 1000)))

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> SimDevice:
        will = MqttWill(
            topic=self.topic(Channel.PRESENCE).value,
            payload=self.payload(Presence(PresenceStatus.OFFLINE, "sim-1.0")),
        )
        settings = MqttSettings(
            host="127.0.0.1",
            port=self.port,
            client_id=self.device_id,
            will=will,
            reconnect_min_s=0.05,
            reconnect_max_s=0.5,
            connect_timeout_s=30,
            operation_timeout_s=30,
        )
        self.client = MqttClient(settings, on_connect=self._on_connect)
        await self.client.start()
        await self.client.wait_connected()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._receive()), loop.create_task(self._resend())]
        return self

    async def stop(self, *, will: bool = False) -> None:
        """Leave: cleanly (``offline`` published first) or with the will (``will=True``)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.client is not None:
            if not will and self.client.connected:
                with contextlib.suppress(MqttError):
                    await self.publish(Presence(PresenceStatus.OFFLINE, "sim-1.0"), retain=True)
            await self.client.stop(send_will=will)
            self.client = None

    async def _on_connect(self, info: ConnectionInfo) -> None:
        assert self.client is not None
        if not info.session_present:
            await self.client.subscribe(
                [(self.topic(c).value, 1) for c in (Channel.DESIRED, Channel.JOBS, Channel.ACK)]
            )
        await self.client.publish(
            self.topic(Channel.PRESENCE).value,
            self.payload(Presence(PresenceStatus.ONLINE, "sim-1.0")),
            retain=True,
        )
        await self.client.publish(
            self.topic(Channel.STATE).value, self.payload(self.state()), retain=True
        )

    # --- sending -------------------------------------------------------------------------------

    def state(self) -> ReportedState:
        return ReportedState(
            active=self.active,
            previous=self.previous,
            installed=tuple(self.installed),
            hardware_class=self.hardware_class,
            labels=dict(self.labels),
            ram_bytes=4 << 30,
            accelerator="none",
            disk_free_bytes=10 << 30,
            desired_sequence=self.applied_sequence,
        )

    async def publish(self, body: Any, *, retain: bool = False) -> str:
        assert self.client is not None
        payload = self.payload(body)
        topic = Topic.for_type(self.fleet, self.device_id, body.TYPE)
        await self.client.publish(topic.value, payload, retain=retain)
        return decode(topic, payload).id

    async def publish_raw(self, channel: Channel, payload: bytes, *, retain: bool = False) -> None:
        assert self.client is not None
        await self.client.publish(self.topic(channel).value, payload, retain=retain)

    async def send_state(self) -> None:
        await self.publish(self.state(), retain=True)

    async def send_telemetry(self, requests: int = 1) -> str:
        return await self.publish(self.telemetry(requests))

    def telemetry(self, requests: int = 1) -> Telemetry:
        return Telemetry(
            window_s=10.0,
            model=None if self.active is None else self.active.key,
            requests=requests,
            errors=0,
            tokens_per_s=Percentiles(40.0, 50.0),
            ttft_ms=Percentiles(90.0, 120.0),
            queue_depth=0,
            cpu_percent=12.5,
            memory_bytes=1 << 28,
            memory_total_bytes=4 << 30,
            disk_free_bytes=10 << 30,
            temperature_c=45.0,
        )

    async def emit(self, body: Event | JobResult) -> str:
        """Put a durable message in the outbox and send it (it is resent until acked)."""
        payload = self.payload(body)
        topic = self.topic(Channel.EVENTS)
        message_id = decode(topic, payload).id
        self.outbox[message_id] = (topic, payload)
        self.sent[message_id] = payload
        with contextlib.suppress(MqttError):
            assert self.client is not None
            await self.client.publish(topic.value, payload)
        return message_id

    async def event(self, kind: EventKind, state: DesiredState | None, **fields: Any) -> str:
        self.seq += 1
        model = None
        if state is not None and state.target is not None:
            model = model_of(state.target.path, state.target.sha256).key
        body = Event(
            seq=self.seq,
            kind=kind,
            model=fields.pop("model", model),
            desired_sequence=None if state is None else state.sequence,
            rollout=None if state is None else state.rollout,
            **fields,
        )
        return await self.emit(body)

    async def _resend(self) -> None:
        while True:
            await asyncio.sleep(self.resend_s)
            for topic, payload in list(self.outbox.values()):
                if self.client is None or not self.client.connected:
                    break
                with contextlib.suppress(MqttError):
                    await self.client.publish(topic.value, payload)

    # --- receiving -----------------------------------------------------------------------------

    async def _receive(self) -> None:
        assert self.client is not None
        async for message in self.client.messages():
            if message.payload:
                try:
                    envelope = decode(message.topic, message.payload)
                except MessageRefused as exc:
                    self.refused.append(exc.code)
                else:
                    await self._handle(envelope)
            self.client.ack(message)

    async def _handle(self, envelope: Envelope) -> None:
        body = envelope.body
        if isinstance(body, Ack):
            for message_id in body.ids:
                self.acks[message_id] += 1
                self.outbox.pop(message_id, None)
        elif isinstance(body, DesiredDocument):
            try:
                state = verify_desired(
                    body,
                    keys=self.keys,
                    fleet=self.fleet,
                    device=self.device_id,
                    last_applied=self.applied_sequence,
                    now=int(time.time()),
                )
            except DesiredStateRefused as exc:
                self.refused.append(exc.code)
                return
            self.desired.append(state)
            await self.apply(state)
        elif isinstance(body, RemoteJob):
            self.jobs.append((envelope.id, body))
            if self.behaviour.answer_jobs:
                await self.emit(
                    JobResult(
                        job_id=envelope.id,
                        state=JobOutcome.SUCCEEDED,
                        result={"choices": [{"text": f"hello from {self.device_id}\u0000"}]},
                    )
                )

    async def apply(self, state: DesiredState) -> None:
        """Act on a verified desired state as the behaviour says, reporting each step."""
        self.applied_sequence = state.sequence
        if state.target is None:  # a release: undo what that rollout switched, as the agent
            if self.active is not None and self.switched_by == state.rollout:
                self.active, self.previous = self.previous, None
                self.switched_by = None
            await self.send_state()
            return
        target = model_of(state.target.path, state.target.sha256)
        outcome = self.behaviour.outcome
        if outcome == SILENT and target != self.active and target not in self.installed:
            return
        await self.event(EventKind.DESIRED_ACCEPTED, state)
        if target == self.active:
            await self.event(EventKind.ACTIVATED, state, health=self._health())
            await self.send_state()
            return
        if target not in self.installed:
            await self.event(EventKind.DOWNLOAD_STARTED, state)
            await self.event(
                EventKind.DOWNLOAD_PROGRESS, state, progress=Progress(done_bytes=1, total_bytes=2)
            )
            if outcome == STOP_AT_DOWNLOAD:
                return
            if outcome == FAIL_INSTALL:
                await self.event(EventKind.INSTALL_FAILED, state, reason="hash mismatch")
                return
            self.installed.append(target)
            await self.event(EventKind.INSTALLED, state)
        if outcome == STOP_AT_INSTALLED:
            return
        if outcome == FAIL_ACTIVATION:
            await self.event(
                EventKind.ACTIVATION_FAILED, state, reason="health check: 0.5 tokens/s < 1.5"
            )
            return
        self.previous, self.active = self.active, target
        self.switched_by = state.rollout
        await self.event(EventKind.ACTIVATED, state, health=self._health())
        await self.send_state()

    def _health(self) -> Health:
        return Health(tokens_per_s=self.behaviour.tokens_per_s, ttft_ms=self.behaviour.ttft_ms)
