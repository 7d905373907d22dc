"""The body of each envelope type (schema v1), as frozen dataclasses.

Each class has ``TYPE`` (the envelope ``type`` it travels as), a strict
``from_json(value, path="body")`` and ``to_json()``. All checks go through
:mod:`edgelm_protocol.schema`, so every body refuses unknown and missing keys, booleans where
integers belong and out-of-range values the same way, and names the JSON path of the fault
(``body.health.tokens_per_s``).

Constructing a body does not validate it; :func:`edgelm_protocol.envelope.encode` does, by
reading ``to_json()`` back through ``from_json``. A sender therefore runs exactly the checks its
receiver will, and cannot publish what the other side refuses.

Nullable fields are always present on the wire (``"model": null``), never omitted, so a
missing key is always a sender's mistake rather than a second way to say null.

The bodies of remote jobs live in :mod:`~edgelm_protocol.remote_jobs` and the desired state's
in :mod:`~edgelm_protocol.desired`; :data:`BODY_CLASSES` maps every ``type`` to its class.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import ClassVar, Self, TypeAlias

from edgelm_protocol.desired import DesiredDocument
from edgelm_protocol.errors import MalformedMessage
from edgelm_protocol.ids import (
    ID_PATTERN,
    SHA256_PATTERN,
    check_message_id,
    check_model_key,
    check_model_name,
    check_model_version,
    check_rollout_id,
)
from edgelm_protocol.remote_jobs import JobResult, RemoteJob
from edgelm_protocol.schema import (
    ObjectReader,
    check_identifier,
    check_pattern,
    check_text,
)
from edgelm_protocol.strict_json import JSONObject, JSONValue, child_path
from edgelm_protocol.topics import MessageType

_SHORT_TEXT = 64  # versions, hardware classes, accelerator names
_REASON_TEXT = 2048
_MAX_INSTALLED = 64  # the payload limit (16 KiB) binds first; this bounds the work per item
_MAX_LABELS = 64
_LABEL_VALUE_TEXT = 256
MAX_ACK_IDS = 1000


class PresenceStatus(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


class EventKind(StrEnum):
    """What happened on the device, in the order a rollout usually sees them."""

    DESIRED_ACCEPTED = "desired_accepted"
    DESIRED_REJECTED = "desired_rejected"
    DOWNLOAD_STARTED = "download_started"
    DOWNLOAD_PROGRESS = "download_progress"
    #: A download failed for a passing reason and is tried again (``reason`` says when and
    #: why). Not progress: the control plane's silence clock keeps running.
    DOWNLOAD_RETRYING = "download_retrying"
    INSTALLED = "installed"
    INSTALL_FAILED = "install_failed"
    INSTALL_CANCELLED = "install_cancelled"
    ACTIVATED = "activated"
    ACTIVATION_FAILED = "activation_failed"
    ROLLED_BACK = "rolled_back"
    #: The device serves no model any more: a release undid the rollout that switched it.
    DEACTIVATED = "deactivated"


@dataclass(frozen=True)
class Presence:
    """Retained on ``presence``; the MQTT will publishes the ``offline`` one."""

    TYPE: ClassVar[MessageType] = MessageType.PRESENCE

    status: PresenceStatus
    agent_version: str

    @classmethod
    def from_json(cls, value: object, path: str = "body") -> Self:
        reader = ObjectReader(value, path, ("status", "agent_version"))
        return cls(
            status=reader.choice("status", PresenceStatus),
            agent_version=reader.text("agent_version", max_chars=_SHORT_TEXT),
        )

    def to_json(self) -> JSONObject:
        return {"status": self.status.value, "agent_version": self.agent_version}


@dataclass(frozen=True)
class ModelRef:
    """A model by name, version and the sha256 of its TUF target."""

    name: str
    version: str
    sha256: str

    @property
    def key(self) -> str:
        """``name@version``, the way events and telemetry name a model."""
        return f"{self.name}@{self.version}"

    @classmethod
    def from_json(cls, value: object, path: str) -> Self:
        reader = ObjectReader(value, path, ("name", "version", "sha256"))
        return cls(
            name=reader.identifier("name", check_model_name),
            version=reader.identifier("version", check_model_version),
            sha256=reader.pattern("sha256", SHA256_PATTERN, "64 lower-case hex"),
        )

    @classmethod
    def optional(cls, reader: ObjectReader, key: str) -> Self | None:
        return None if reader.is_null(key) else cls.from_json(reader.raw(key), reader.at(key))

    def to_json(self) -> JSONObject:
        return {"name": self.name, "version": self.version, "sha256": self.sha256}


def _labels(reader: ObjectReader, key: str) -> dict[str, str]:
    # Label keys are rollout selectors, so they use the id alphabet; values are free text.
    value = reader.raw(key)
    path = reader.at(key)
    if not isinstance(value, dict) or len(value) > _MAX_LABELS:
        raise MalformedMessage(
            f"{path} must be an object of at most {_MAX_LABELS} string labels", field=path
        )
    labels: dict[str, str] = {}
    for label, text in value.items():
        label_path = child_path(path, label)
        check_pattern(label, label_path, ID_PATTERN, "a label key in the id alphabet")
        labels[label] = check_text(text, label_path, max_chars=_LABEL_VALUE_TEXT, min_chars=0)
    return labels


@dataclass(frozen=True)
class ReportedState:
    """Retained on ``state``: what the device runs and what it could run."""

    TYPE: ClassVar[MessageType] = MessageType.STATE

    active: ModelRef | None
    previous: ModelRef | None
    installed: tuple[ModelRef, ...]
    hardware_class: str
    labels: Mapping[str, str]
    ram_bytes: int
    accelerator: str
    disk_free_bytes: int
    desired_sequence: int  # the last desired state applied, 0 if none

    @classmethod
    def from_json(cls, value: object, path: str = "body") -> Self:
        keys = (
            "active", "previous", "installed", "hardware_class", "labels", "ram_bytes",
            "accelerator", "disk_free_bytes", "desired_sequence",
        )  # fmt: skip
        reader = ObjectReader(value, path, keys)
        installed = reader.items("installed", min_items=0, max_items=_MAX_INSTALLED)
        return cls(
            active=ModelRef.optional(reader, "active"),
            previous=ModelRef.optional(reader, "previous"),
            installed=tuple(ModelRef.from_json(item, at) for at, item in installed),
            hardware_class=reader.text("hardware_class", max_chars=_SHORT_TEXT),
            labels=MappingProxyType(_labels(reader, "labels")),
            ram_bytes=reader.integer("ram_bytes"),
            accelerator=reader.text("accelerator", max_chars=_SHORT_TEXT),
            disk_free_bytes=reader.integer("disk_free_bytes"),
            desired_sequence=reader.integer("desired_sequence"),
        )

    def to_json(self) -> JSONObject:
        installed: list[JSONValue] = [model.to_json() for model in self.installed]
        return {
            "active": None if self.active is None else self.active.to_json(),
            "previous": None if self.previous is None else self.previous.to_json(),
            "installed": installed,
            "hardware_class": self.hardware_class,
            "labels": dict(self.labels),
            "ram_bytes": self.ram_bytes,
            "accelerator": self.accelerator,
            "disk_free_bytes": self.disk_free_bytes,
            "desired_sequence": self.desired_sequence,
        }


@dataclass(frozen=True)
class Percentiles:
    """p50 and p90 over a telemetry window; null when the window had no samples."""

    p50: float | None
    p90: float | None

    @classmethod
    def from_json(cls, value: object, path: str) -> Self:
        reader = ObjectReader(value, path, ("p50", "p90"))
        return cls(p50=reader.optional_number("p50"), p90=reader.optional_number("p90"))

    def to_json(self) -> JSONObject:
        return {"p50": self.p50, "p90": self.p90}


@dataclass(frozen=True)
class Telemetry:
    """One batch of metrics over ``window_s`` seconds. ``model`` is ``name@version``."""

    TYPE: ClassVar[MessageType] = MessageType.TELEMETRY

    window_s: float
    model: str | None
    requests: int
    errors: int
    tokens_per_s: Percentiles
    ttft_ms: Percentiles
    queue_depth: int
    cpu_percent: float | None
    memory_bytes: int | None
    memory_total_bytes: int | None
    disk_free_bytes: int | None
    temperature_c: float | None

    @classmethod
    def from_json(cls, value: object, path: str = "body") -> Self:
        keys = (
            "window_s", "model", "requests", "errors", "tokens_per_s", "ttft_ms", "queue_depth",
            "cpu_percent", "memory_bytes", "memory_total_bytes", "disk_free_bytes",
            "temperature_c",
        )  # fmt: skip
        reader = ObjectReader(value, path, keys)
        return cls(
            window_s=reader.number("window_s", exclusive_minimum=True, maximum=86_400.0),
            model=reader.optional_identifier("model", check_model_key),
            requests=reader.integer("requests"),
            errors=reader.integer("errors"),
            tokens_per_s=Percentiles.from_json(
                reader.raw("tokens_per_s"), reader.at("tokens_per_s")
            ),
            ttft_ms=Percentiles.from_json(reader.raw("ttft_ms"), reader.at("ttft_ms")),
            queue_depth=reader.integer("queue_depth"),
            cpu_percent=reader.optional_number("cpu_percent"),
            memory_bytes=reader.optional_integer("memory_bytes"),
            memory_total_bytes=reader.optional_integer("memory_total_bytes"),
            disk_free_bytes=reader.optional_integer("disk_free_bytes"),
            temperature_c=reader.optional_number("temperature_c", minimum=-273.15, maximum=1000.0),
        )

    def to_json(self) -> JSONObject:
        return {
            "window_s": self.window_s,
            "model": self.model,
            "requests": self.requests,
            "errors": self.errors,
            "tokens_per_s": self.tokens_per_s.to_json(),
            "ttft_ms": self.ttft_ms.to_json(),
            "queue_depth": self.queue_depth,
            "cpu_percent": self.cpu_percent,
            "memory_bytes": self.memory_bytes,
            "memory_total_bytes": self.memory_total_bytes,
            "disk_free_bytes": self.disk_free_bytes,
            "temperature_c": self.temperature_c,
        }


@dataclass(frozen=True)
class Health:
    """The health check's measurements of a newly activated model."""

    tokens_per_s: float | None
    ttft_ms: float | None

    def to_json(self) -> JSONObject:
        return {"tokens_per_s": self.tokens_per_s, "ttft_ms": self.ttft_ms}


@dataclass(frozen=True)
class Progress:
    done_bytes: int
    total_bytes: int

    def to_json(self) -> JSONObject:
        return {"done_bytes": self.done_bytes, "total_bytes": self.total_bytes}


@dataclass(frozen=True)
class Event:
    """Something happened on the device. ``seq`` grows per device, for ordering on the server."""

    TYPE: ClassVar[MessageType] = MessageType.EVENT

    seq: int
    kind: EventKind
    model: str | None = None
    desired_sequence: int | None = None
    rollout: str | None = None
    reason: str | None = None
    health: Health | None = None
    progress: Progress | None = None

    @classmethod
    def from_json(cls, value: object, path: str = "body") -> Self:
        keys = (
            "seq", "kind", "model", "desired_sequence", "rollout", "reason", "health",
            "progress",
        )  # fmt: skip
        reader = ObjectReader(value, path, keys)
        health = reader.optional_nested("health", ("tokens_per_s", "ttft_ms"))
        progress = reader.optional_nested("progress", ("done_bytes", "total_bytes"))
        return cls(
            seq=reader.integer("seq"),
            kind=reader.choice("kind", EventKind),
            model=reader.optional_identifier("model", check_model_key),
            desired_sequence=reader.optional_integer("desired_sequence"),
            rollout=reader.optional_identifier("rollout", check_rollout_id),
            reason=reader.optional_text("reason", max_chars=_REASON_TEXT, multiline=True),
            health=None
            if health is None
            else Health(
                tokens_per_s=health.optional_number("tokens_per_s"),
                ttft_ms=health.optional_number("ttft_ms"),
            ),
            progress=None if progress is None else _progress(progress),
        )

    def to_json(self) -> JSONObject:
        return {
            "seq": self.seq,
            "kind": self.kind.value,
            "model": self.model,
            "desired_sequence": self.desired_sequence,
            "rollout": self.rollout,
            "reason": self.reason,
            "health": None if self.health is None else self.health.to_json(),
            "progress": None if self.progress is None else self.progress.to_json(),
        }


def _progress(reader: ObjectReader) -> Progress:
    total = reader.integer("total_bytes")
    done = reader.integer("done_bytes", maximum=total)
    return Progress(done_bytes=done, total_bytes=total)


@dataclass(frozen=True)
class Ack:
    """The control plane has durably stored these messages; the device may drop them."""

    TYPE: ClassVar[MessageType] = MessageType.ACK

    ids: tuple[str, ...]

    @classmethod
    def from_json(cls, value: object, path: str = "body") -> Self:
        reader = ObjectReader(value, path, ("ids",))
        items = reader.items("ids", min_items=1, max_items=MAX_ACK_IDS)
        return cls(ids=tuple(check_identifier(item, at, check_message_id) for at, item in items))

    def to_json(self) -> JSONObject:
        return {"ids": list(self.ids)}


@dataclass(frozen=True)
class Announce:
    """The newest TUF timestamp version, so devices refresh now rather than at the next poll."""

    TYPE: ClassVar[MessageType] = MessageType.ANNOUNCE

    timestamp_version: int

    @classmethod
    def from_json(cls, value: object, path: str = "body") -> Self:
        reader = ObjectReader(value, path, ("timestamp_version",))
        return cls(timestamp_version=reader.integer("timestamp_version", minimum=1))

    def to_json(self) -> JSONObject:
        return {"timestamp_version": self.timestamp_version}


Body: TypeAlias = (
    Presence
    | ReportedState
    | Telemetry
    | Event
    | JobResult
    | DesiredDocument
    | RemoteJob
    | Ack
    | Announce
)

_ALL_BODIES: tuple[type[Body], ...] = (
    Presence, ReportedState, Telemetry, Event, JobResult, DesiredDocument, RemoteJob, Ack, Announce,
)  # fmt: skip

BODY_CLASSES: Mapping[MessageType, type[Body]] = MappingProxyType(
    {body_class.TYPE: body_class for body_class in _ALL_BODIES}
)
"""The body class for each envelope ``type``."""
