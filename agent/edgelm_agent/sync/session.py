"""The sync session: the agent's side of the fleet protocol, as a pure core.

Messages from the broker and local happenings go in; actions come out, which the I/O shell
(:mod:`edgelm_agent.sync.service`) carries out. There are no sockets, clocks or files here:
the shell passes the time, and the tests drive the session as h11's tests drive its state
machine.

::

    inputs                                   actions
    ──────                                   ───────
    connected(now)                     ──►   Subscribe, Publish(presence online), PublishState
    disconnected()                           (every durable message is resent after it)
    message(topic, payload, token, now) ──►  AckInbound, DeleteOutbox, ApplyDesired,
                                             EnqueueJob, ReportEvent, Refresh, Dropped,
                                             RefreshForKey
    retry_desired(topic, document, now) ──►  ApplyDesired, or Dropped + ReportEvent
    outbox(messages, now)              ──►   Publish (each message at most once per
                                             ack timeout), DeleteOutbox (what can never go)
    published(message) / publish_failed(message)
    desired_done(sequence)

Delivery rules kept here:

* **End to end.** A result or event leaves the outbox only when an ``ack`` naming its id
  arrives from the control plane; until then it is sent again after ``ack_timeout_s`` and
  after every reconnect (the control plane deduplicates by id). Telemetry goes on PUBACK.
* **Inbound.** Every message the broker delivers is acknowledged (``AckInbound``), except a
  remote job, which the shell acknowledges only once it is committed to the job queue, so a
  crash before that makes the broker deliver it again. Duplicates of jobs are left to the job
  queue, which knows them durably by their idempotency key.
* **Latest wins.** A desired state is acted on only if it verifies (signature, device,
  sequence above the last applied or in progress, not expired); a newer one supersedes the one
  in progress; the retained copy of the state last applied, which the broker replays at every
  connect, is ignored quietly, while an older sequence is reported as a replay.
* **Keys from the root only.** A desired state whose signatures are all by keys the device
  does not know may be the director's new key, named by a root the device has not walked to
  yet: ``RefreshForKey`` asks the shell to refresh the TUF metadata (which may change
  ``keys``, from the verified root) and hand the document back through
  :meth:`SyncSession.retry_desired`, which verifies it once more and refuses it for good if
  it still fails. Nothing in a message ever adds a key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from edgelm_agent.jobs.outbox import MessageKind, OutboxMessage
from edgelm_protocol import (
    Ack,
    Announce,
    DesiredDocument,
    DesiredState,
    DesiredStateRefused,
    Envelope,
    Event,
    EventKind,
    ForgedDesiredState,
    JobResult,
    MessageRefused,
    MessageTooLarge,
    Presence,
    PresenceStatus,
    ProtocolError,
    RecentIds,
    RemoteJob,
    StaleDesiredState,
    Telemetry,
    decode,
    encode,
    new_envelope,
    verify_desired,
)
from edgelm_protocol.signing import DirectorKeys
from edgelm_protocol.topics import Channel, Topic

QOS = 1
INBOUND_CHANNELS = (Channel.DESIRED, Channel.JOBS, Channel.ACK)
SEEN_CAPACITY = 4096


# --- actions -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Subscribe:
    filters: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Publish:
    topic: str
    payload: bytes
    retain: bool = False
    #: The outbox message this carries, if any: the shell reports its PUBACK or failure.
    message: OutboxMessage | None = None


@dataclass(frozen=True)
class PublishState:
    """Publish the device's reported state (retained); the shell knows what it is."""


@dataclass(frozen=True)
class AckInbound:
    token: Any  # the shell's handle on the broker's message


@dataclass(frozen=True)
class DeleteOutbox:
    ids: tuple[str, ...]


@dataclass(frozen=True)
class ApplyDesired:
    """Install and activate this target now, superseding whatever is in progress."""

    state: DesiredState


@dataclass(frozen=True)
class EnqueueJob:
    """Commit this remote job to the job queue, then acknowledge ``token``."""

    message_id: str
    job: RemoteJob
    token: Any


@dataclass(frozen=True)
class ReportEvent:
    """Put an event in the outbox (the shell adds the outbox's sequence number as ``seq``)."""

    kind: EventKind
    reason: str | None = None
    desired_sequence: int | None = None
    rollout: str | None = None
    model: str | None = None


@dataclass(frozen=True)
class Refresh:
    """The control plane announced new metadata: refresh the repository's metadata now."""

    timestamp_version: int


@dataclass(frozen=True)
class RefreshForKey:
    """A desired state signed only by keys this device does not trust (yet): refresh the
    repository's metadata, then pass it to :meth:`SyncSession.retry_desired`."""

    topic: str
    document: DesiredDocument
    keyids: tuple[str, ...]


@dataclass(frozen=True)
class Dropped:
    """A message that was refused or could not be sent: the shell logs it."""

    topic: str
    code: str
    reason: str


Action = (
    Subscribe
    | Publish
    | PublishState
    | AckInbound
    | DeleteOutbox
    | ApplyDesired
    | EnqueueJob
    | ReportEvent
    | Refresh
    | RefreshForKey
    | Dropped
)


#: How far a desired state's ``issued_at`` may move the last-known-good time past the
#: device's own clock.
MAX_CLOCK_SKEW_S = 24 * 3600

# --- the session -------------------------------------------------------------------------------


@dataclass
class SyncSession:
    fleet: str
    device: str
    keys: DirectorKeys
    agent_version: str
    #: Sequence of the last desired state this device applied (persisted by the shell).
    applied_sequence: int = 0
    #: ``issued_at`` of the newest desired state it applied (persisted by the shell): the
    #: last-known-good time. Expiry is judged at max(clock, this), so a device whose clock
    #: fell back (no RTC, a dead battery) cannot be fed a state that expired long ago.
    known_good_s: int = 0
    ack_timeout_s: float = 30.0
    connected: bool = False
    #: The desired state being applied now, if any.
    in_progress: DesiredState | None = None
    #: Durable messages sent and not yet acknowledged, by id: when they were sent.
    _inflight: dict[str, float] = field(default_factory=dict)
    _seen: RecentIds = field(default_factory=lambda: RecentIds(SEEN_CAPACITY))
    _inbound_topics: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        own = {self.topic(channel) for channel in INBOUND_CHANNELS}
        self._inbound_topics = frozenset({*own, Topic.announce(self.fleet).value})

    # --- the connection ---

    def topic(self, channel: Channel) -> str:
        return Topic.for_device(self.fleet, self.device, channel).value

    def presence(self, status: PresenceStatus, now_ms: int) -> bytes:
        body = Presence(status=status, agent_version=self.agent_version)
        return encode(new_envelope(body, sender=self.device, ts_ms=now_ms))

    def on_connected(self, now_ms: int) -> list[Action]:
        self.connected = True
        self._inflight.clear()  # whatever was unacknowledged goes again on this connection
        filters = tuple((self.topic(c), QOS) for c in INBOUND_CHANNELS)
        announce = Topic.announce(self.fleet).value
        return [
            Subscribe((*filters, (announce, QOS))),
            Publish(
                self.topic(Channel.PRESENCE),
                self.presence(PresenceStatus.ONLINE, now_ms),
                retain=True,
            ),
            PublishState(),
        ]

    def on_disconnected(self) -> None:
        self.connected = False
        self._inflight.clear()

    # --- inbound ---

    def on_message(self, topic: str, payload: bytes, token: Any, now_s: int) -> list[Action]:
        if topic not in self._inbound_topics:
            # Only a misrouting broker delivers what we did not subscribe to (amqtt sends
            # other clients' retained messages): not ours, so not even worth a rejection.
            return [Dropped(topic, "not_my_topic", "not a topic this device subscribes to"),
                    AckInbound(token)]  # fmt: skip
        try:
            envelope = decode(topic, payload)
        except MessageRefused as exc:
            return [Dropped(topic, exc.code, str(exc)), AckInbound(token)]
        body = envelope.body
        if isinstance(body, RemoteJob):
            # No in-memory deduplication: the job queue knows a job durably by its key.
            return [EnqueueJob(envelope.id, body, token)]
        if not self._seen.admit(envelope.id):
            return [AckInbound(token)]  # delivered twice (QoS 1): done the first time
        if isinstance(body, Ack):
            for message_id in body.ids:
                self._inflight.pop(message_id, None)
            return [DeleteOutbox(tuple(body.ids)), AckInbound(token)]
        if isinstance(body, DesiredDocument):
            return [*self._desired(topic, body, now_s), AckInbound(token)]
        if isinstance(body, Announce):
            return [Refresh(body.timestamp_version), AckInbound(token)]
        # decode() only returns types the topic carries; the device receives no others.
        # Acknowledged all the same: an unacknowledged message holds an in-flight slot.
        return [
            Dropped(topic, "unexpected_type", f"{envelope.type} is not for devices"),
            AckInbound(token),
        ]

    def retry_desired(self, topic: str, document: DesiredDocument, now_s: int) -> list[Action]:
        """The document of a ``RefreshForKey``, after the refresh: acted on if it verifies
        now, else refused (reported), with no second refresh."""
        return self._desired(topic, document, now_s, retried=True)

    def _desired(
        self, topic: str, document: DesiredDocument, now_s: int, *, retried: bool = False
    ) -> list[Action]:
        newest = max(self.applied_sequence, self.in_progress.sequence if self.in_progress else 0)
        try:
            state = verify_desired(
                document,
                keys=self.keys,
                fleet=self.fleet,
                device=self.device,
                last_applied=newest,
                now=max(now_s, self.known_good_s),
            )
        except StaleDesiredState as exc:
            if exc.sequence == newest:
                return []  # the retained copy of what we applied or apply now: nothing new
            return self._rejected(topic, exc)
        except ForgedDesiredState as exc:
            unknown = not any(keyid in self.keys for keyid in exc.keyids)
            if unknown and exc.keyids and not retried:
                return [RefreshForKey(topic, document, exc.keyids)]
            return self._rejected(topic, exc)
        except DesiredStateRefused as exc:
            return self._rejected(topic, exc)
        except ProtocolError as exc:  # signed but malformed, or not signable at all
            return self._rejected(topic, exc)
        self.in_progress = state
        return [ApplyDesired(state)]

    def _rejected(self, topic: str, exc: ProtocolError) -> list[Action]:
        sequence = getattr(exc, "sequence", None)
        return [
            Dropped(topic, exc.code, str(exc)),
            ReportEvent(
                EventKind.DESIRED_REJECTED,
                reason=f"{exc.code}: {exc}",
                desired_sequence=sequence if isinstance(sequence, int) else None,
            ),
        ]

    def on_desired_done(self, sequence: int, issued_at: int = 0, now_s: int = 0) -> None:
        """The desired state ``sequence`` (issued at ``issued_at``) was acted on, whatever
        the outcome: a replay of it is ignored from now on."""
        self.applied_sequence = max(self.applied_sequence, sequence)
        # Bounded by our own clock (plus a day of skew) when that clock is plausible: one
        # state signed by a director whose clock ran far ahead must not make every later,
        # correctly dated state look expired for ever.
        reference = max(now_s, self.known_good_s)
        self.known_good_s = max(self.known_good_s, min(issued_at, reference + MAX_CLOCK_SKEW_S))
        if self.in_progress is not None and self.in_progress.sequence <= sequence:
            self.in_progress = None

    # --- outbound ---

    def on_outbox(self, messages: Sequence[OutboxMessage], now_s: float) -> list[Action]:
        """Publish what is due: every message not sent on this connection, and durable
        messages whose acknowledgement is overdue. Nothing while disconnected."""
        if not self.connected:
            return []
        actions: list[Action] = []
        for message in messages:
            sent = self._inflight.get(message.id)
            if sent is not None and now_s - sent < self.ack_timeout_s:
                continue
            try:
                topic, payload = self._encoded(message, int(now_s * 1000))
            except ProtocolError as exc:
                # A message that can never be sent must not block those behind it.
                actions += [
                    Dropped(self.topic(Channel.EVENTS), exc.code, str(exc)),
                    DeleteOutbox((message.id,)),
                ]
                continue
            if message.kind != MessageKind.TELEMETRY:
                self._inflight[message.id] = now_s
            actions.append(Publish(topic, payload, message=message))
        return actions

    def on_published(self, message: OutboxMessage) -> list[Action]:
        if message.kind == MessageKind.TELEMETRY:
            return [DeleteOutbox((message.id,))]  # telemetry may go on PUBACK
        return []  # durable: it goes when the control plane acknowledges it

    def on_publish_failed(self, message: OutboxMessage) -> None:
        self._inflight.pop(message.id, None)  # sent again at the next drain

    def _encoded(self, message: OutboxMessage, now_ms: int) -> tuple[str, bytes]:
        body = message.body
        if message.kind == MessageKind.TELEMETRY:
            return self.topic(Channel.TELEMETRY), self._encode(message, Telemetry.from_json(body))
        if message.kind == MessageKind.EVENT:
            event = Event.from_json({**body, "seq": message.seq})
            return self.topic(Channel.EVENTS), self._encode(message, event)
        result = JobResult.from_json(_complete_result(body))
        try:
            return self.topic(Channel.EVENTS), self._encode(message, result)
        except MessageTooLarge as exc:
            return self.topic(Channel.EVENTS), self._encode(message, _too_large(result, exc))

    def _encode(self, message: OutboxMessage, body: Any) -> bytes:
        # The outbox id is the envelope id: what the control plane acknowledges.
        envelope = Envelope(id=message.id, sender=self.device, ts_ms=_ms(message), body=body)
        return encode(envelope)


def _ms(message: OutboxMessage) -> int:
    return int(message.created_at * 1000)


def _complete_result(body: dict[str, Any]) -> dict[str, Any]:
    """Results an older agent queued lack the keys their outcome did not use."""
    return {"metadata": None, "result": None, "error": None, **body}


def _too_large(result: JobResult, exc: MessageTooLarge) -> JobResult:
    """A result over the protocol's limit still tells the control plane how the job ended."""
    return JobResult.from_json(
        {
            "job_id": result.job_id,
            "state": "failed",
            "metadata": result.metadata,
            "result": None,
            "error": {
                "code": "result_too_large",
                "message": f"the result is {exc.size_bytes} bytes, over the "
                f"{exc.limit_bytes}-byte limit of a message; it is kept on the device",
            },
        }
    )
