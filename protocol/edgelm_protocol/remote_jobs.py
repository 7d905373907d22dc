"""The two bodies of a remote job: the job the control plane sends, the result the device sends.

A remote job travels on ``dev/{device}/jobs`` as a :class:`RemoteJob`; its envelope id is the
job's idempotency key on the device (QoS 1 may deliver it twice, the job queue runs it once).
The device answers on ``dev/{device}/events`` with a :class:`JobResult` whose ``job_id`` is that
envelope id, and keeps the result in its outbox until an ``ack`` names the result's own id.

``request`` is an OpenAI chat or completion body. It is checked here as plain JSON only (an
object, within the depth and string rules); the agent's API validates it as a request, with the
same code that serves local clients, so the two paths cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar, Self

from edgelm_protocol.ids import check_job_id
from edgelm_protocol.schema import ObjectReader
from edgelm_protocol.strict_json import JSONObject
from edgelm_protocol.topics import MessageType

_ERROR_CODE_TEXT = 64
_ERROR_MESSAGE_TEXT = 4096
MAX_TTL_S = 31_536_000.0  # a year: a longer TTL is a unit mistake (ms for s), not a plan


class JobOutcome(StrEnum):
    """How a remote job ended; the final states of the agent's job lifecycle."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DEAD = "dead"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


@dataclass(frozen=True)
class JobError:
    """Why a job failed: ``code`` and ``message``, plus any further keys (``param``, ...)."""

    code: str
    message: str
    details: JSONObject = field(default_factory=dict)

    @classmethod
    def from_json(cls, value: object, path: str) -> Self:
        reader = ObjectReader(value, path, ("code", "message"), allow_extra=True)
        return cls(
            code=reader.text("code", max_chars=_ERROR_CODE_TEXT),
            message=reader.text("message", max_chars=_ERROR_MESSAGE_TEXT, multiline=True),
            details=reader.extra(),
        )

    def to_json(self) -> JSONObject:
        return {**self.details, "code": self.code, "message": self.message}


@dataclass(frozen=True)
class JobResult:
    """How a job ended. ``job_id`` is the message id of the ``job`` envelope for a fleet job,
    or the device's own job id for a job a local app submitted with ``report: upstream``."""

    TYPE: ClassVar[MessageType] = MessageType.JOB_RESULT

    job_id: str
    state: JobOutcome
    metadata: JSONObject | None = None
    result: JSONObject | None = None
    error: JobError | None = None

    @classmethod
    def from_json(cls, value: object, path: str = "body") -> Self:
        reader = ObjectReader(value, path, ("job_id", "state", "metadata", "result", "error"))
        return cls(
            job_id=reader.identifier("job_id", check_job_id),
            state=reader.choice("state", JobOutcome),
            metadata=reader.optional_json_object("metadata"),
            result=reader.optional_json_object("result"),
            error=None
            if reader.is_null("error")
            else JobError.from_json(reader.raw("error"), reader.at("error")),
        )

    def to_json(self) -> JSONObject:
        return {
            "job_id": self.job_id,
            "state": self.state.value,
            "metadata": self.metadata,
            "result": self.result,
            "error": None if self.error is None else self.error.to_json(),
        }


@dataclass(frozen=True)
class RemoteJob:
    """A job sent by the control plane. The envelope id is its idempotency key on the device."""

    TYPE: ClassVar[MessageType] = MessageType.JOB

    request: JSONObject  # an OpenAI chat or completion body; the agent's API validates it
    priority: int = 0
    ttl_s: float | None = None
    metadata: JSONObject | None = None
    max_attempts: int = 3  # the agent's job store default
    wait_for_model: bool = False

    @classmethod
    def from_json(cls, value: object, path: str = "body") -> Self:
        keys = ("request", "priority", "ttl_s", "metadata", "max_attempts", "wait_for_model")
        reader = ObjectReader(value, path, keys)
        return cls(
            request=reader.json_object("request"),
            priority=reader.integer("priority", minimum=-100, maximum=100),
            ttl_s=reader.optional_number("ttl_s", exclusive_minimum=True, maximum=MAX_TTL_S),
            metadata=reader.optional_json_object("metadata"),
            max_attempts=reader.integer("max_attempts", minimum=1, maximum=10),
            wait_for_model=reader.boolean("wait_for_model"),
        )

    def to_json(self) -> JSONObject:
        return {
            "request": self.request,
            "priority": self.priority,
            "ttl_s": self.ttl_s,
            "metadata": self.metadata,
            "max_attempts": self.max_attempts,
            "wait_for_model": self.wait_for_model,
        }
