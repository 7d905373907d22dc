"""edgelm's wire contract, shared by the agent, the control plane and provisioning (sans-IO).

Bytes and values in, values or typed errors out: no sockets, no files, no clocks. The caller
passes the time (``ts_ms``, ``now``) and may inject the id factory, so every function here is
deterministic in tests, and the agent and the control plane, which never import each other,
agree on the wire because both run this code.

Modules:

* :mod:`~edgelm_protocol.errors`: the error tree (root :class:`ProtocolError`), each with a
  ``code`` for logs.
* :mod:`~edgelm_protocol.ids`: fleet, device, message, rollout ids and model names.
* :mod:`~edgelm_protocol.topics`: :class:`Topic` and :class:`TopicFilter` values, the channel
  table (direction, QoS, retained, types).
* :mod:`~edgelm_protocol.envelope`: :func:`encode` and :func:`decode` with the strict checks,
  size limits per type.
* :mod:`~edgelm_protocol.bodies` and :mod:`~edgelm_protocol.remote_jobs`: one frozen dataclass
  per body type.
* :mod:`~edgelm_protocol.desired`: the signed desired state, :func:`sign_desired` and
  :func:`verify_desired`.
* :mod:`~edgelm_protocol.signing`: canonical JSON bytes, keyids, :class:`DirectorKeys`.
* :mod:`~edgelm_protocol.dedupe`: :class:`RecentIds`, for dropping redelivered messages.
* :mod:`~edgelm_protocol.targets` and :mod:`~edgelm_protocol.bundle`: the signed model target
  schema (``custom["edgelm"]``) and the ONNX bundle manifest, which the agent reads and the
  control plane and provisioning write.
* :mod:`~edgelm_protocol.strict_json` and :mod:`~edgelm_protocol.schema`: the strict JSON
  parser and field readers the others are built on.

Two subpackages do I/O and are not imported here: :mod:`edgelm_protocol.mqtt`, the asyncio MQTT
client both the agent and the control plane use, and :mod:`edgelm_protocol.repository`, the TUF
repository writer that a standalone agent, provisioning and the control plane share.
"""

from edgelm_protocol.bodies import (
    BODY_CLASSES,
    Ack,
    Announce,
    Body,
    Event,
    EventKind,
    Health,
    ModelRef,
    Percentiles,
    Presence,
    PresenceStatus,
    Progress,
    ReportedState,
    Telemetry,
)
from edgelm_protocol.dedupe import RecentIds
from edgelm_protocol.desired import (
    DesiredDocument,
    DesiredState,
    Signature,
    TargetRef,
    sign_desired,
    verify_desired,
)
from edgelm_protocol.envelope import (
    MAX_PAYLOAD_BYTES,
    SCHEMA_VERSION,
    Envelope,
    channel_payload_limit,
    decode,
    encode,
    new_envelope,
)
from edgelm_protocol.errors import (
    DesiredStateRefused,
    ExpiredDesiredState,
    ForgedDesiredState,
    InvalidBundle,
    InvalidId,
    InvalidKey,
    InvalidModelMetadata,
    InvalidTopic,
    MalformedMessage,
    MessageRefused,
    MessageTooLarge,
    ProtocolError,
    StaleDesiredState,
    TargetRefused,
    TopicMismatch,
    UnsafeTargetPath,
    UnsupportedVersion,
    WrongDevice,
)
from edgelm_protocol.ids import (
    CONTROL_SENDER,
    check_device_id,
    check_fleet_id,
    check_message_id,
    new_message_id,
)
from edgelm_protocol.remote_jobs import JobError, JobOutcome, JobResult, RemoteJob
from edgelm_protocol.signing import DirectorKeys, canonical_bytes, key_id
from edgelm_protocol.strict_json import JSONObject, JSONValue
from edgelm_protocol.topics import (
    CHANNEL_FOR_TYPE,
    CHANNELS,
    Channel,
    ChannelSpec,
    Direction,
    MessageType,
    Topic,
    TopicFilter,
)

__all__ = [
    "BODY_CLASSES",
    "CHANNELS",
    "CHANNEL_FOR_TYPE",
    "CONTROL_SENDER",
    "MAX_PAYLOAD_BYTES",
    "SCHEMA_VERSION",
    "Ack",
    "Announce",
    "Body",
    "Channel",
    "ChannelSpec",
    "DesiredDocument",
    "DesiredState",
    "DesiredStateRefused",
    "Direction",
    "DirectorKeys",
    "Envelope",
    "Event",
    "EventKind",
    "ExpiredDesiredState",
    "ForgedDesiredState",
    "Health",
    "InvalidBundle",
    "InvalidId",
    "InvalidKey",
    "InvalidModelMetadata",
    "InvalidTopic",
    "JSONObject",
    "JSONValue",
    "JobError",
    "JobOutcome",
    "JobResult",
    "MalformedMessage",
    "MessageRefused",
    "MessageTooLarge",
    "MessageType",
    "ModelRef",
    "Percentiles",
    "Presence",
    "PresenceStatus",
    "Progress",
    "ProtocolError",
    "RecentIds",
    "RemoteJob",
    "ReportedState",
    "Signature",
    "StaleDesiredState",
    "TargetRef",
    "TargetRefused",
    "Telemetry",
    "Topic",
    "TopicFilter",
    "TopicMismatch",
    "UnsafeTargetPath",
    "UnsupportedVersion",
    "WrongDevice",
    "canonical_bytes",
    "channel_payload_limit",
    "check_device_id",
    "check_fleet_id",
    "check_message_id",
    "decode",
    "encode",
    "key_id",
    "new_envelope",
    "new_message_id",
    "sign_desired",
    "verify_desired",
]
